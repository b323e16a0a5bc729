"""``label_issue``: probable label errors by confident learning.

Northcutt, Jiang and Chuang (2021), "Confident learning: estimating uncertainty in dataset
labels", JAIR 70; cleanlab's ``find_label_issues``. Per class j a self-confidence threshold
``t_j`` = the mean probability of j over the images *labelled* j (what the classifier typically
says when j is right); an image labelled i is "confidently" of class j when ``p_j >= t_j`` (the
largest such ``p_j`` when several pass). Two filters are used:

* :func:`confident_learning` (``filter_by="confident_learning"``): an issue when the confident
  class exists and is not i;
* :func:`prune_by_class` (``filter_by="prune_by_class"``): the confident images estimate *how
  many* images of each class are mislabelled (the calibrated confident joint), and that many
  images labelled i with the lowest ``p_i`` are issues.

The probabilities come from one of two views.

**Object view** (images with an object embedding: a mask and the counterfactual pass),
``prune_by_class``. The classifier is a k-nearest-neighbour vote (``label_knn`` = 20,
leave-one-out) over the model's embeddings of the *objects alone*: the target layer's mean
activation on the Only-FG image (the object on a flat grey canvas,
:mod:`biasscope.counterfactuals`), power-normalised (``sign(x) sqrt|x|``, Perronnin et al.
2010), L2-normalised and, above 128 channels, reduced by PCA. ``p_j`` is the share of an
image's k most similar objects labelled j: out-of-sample, as confident learning wants, and
blind to the background. Why not the model's own probabilities: the detector exists for models
one does not yet trust, and a model with a background shortcut is confidently wrong about many
correctly labelled images -- on the built-in benchmark's biased model, confident learning on
its probabilities flags 159 images for 32 flipped labels (precision 0.15) -- while it still
embeds the *shapes* of objects well enough to tell which labels disagree with their
look-alikes (figures in ``tests/test_benchmark_findings.py`` and the README). For the same
reason the model agreeing with the label does not clear an image: the shortcut model calls a
"two" on the "one" background "one", matching its wrong label "one". ``prune_by_class`` rather
than the plain rule: kNN shares are coarse (multiples of 1/k) and a mislabelled object whose
neighbours are 15 of 20 of its true class misses a threshold of 0.85; on the benchmark the
plain rule found 22 of 32 flips on the unbiased model where ``prune_by_class`` found 28.

**Model view** (images without an embedding), ``confident_learning``. The model's
probabilities: a scan stores ``label_prob`` (exact) and the top-5 outputs with their
probabilities, not full vectors. With at most five classes that *is* the full vector. With
more, the mass missing from the top 5 is spread evenly over the dataset classes outside it --
an upper bound for each of them, and far below any threshold ``t_j`` of a class the model can
recognise, so it rarely creates an issue.
As in cleanlab, an image is not an issue when the model's prediction equals its label. Where
the image has a mask, a candidate is kept only when the Grad-CAM of the *labelled* class is no
better than chance on the object (``lift_true`` below ``label_max_lift`` = 1): a true label
leaves its evidence on the object even when the model is fooled by the background.

Evidence per image: ``p_given`` / ``p_suggested`` of its view, the model's own
(``model_p_given`` / ``model_p_suggested``), in the object view the nearest neighbours with the
suggested label, and the Grad-CAM of the labelled class (``heatmaps_true``) against that of the
predicted class: under a quarter of its mass (``label_cam_weak``) means the model finds little
of the labelled class anywhere in the image.

Per-image score: ``1 - p_label`` under the view used (higher = more likely mislabelled).
Findings: one per labelled class, its (given, suggested) pairs in ``evidence.pairs`` and its
images (each with its suggested class) in ``evidence.images``.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Detector, DetectorResult, register


def class_probabilities(ctx: Context) -> np.ndarray:
    """Per-image probabilities over ``ctx.classes`` (N, K), rebuilt from top5/label_prob."""
    n, K = ctx.n, len(ctx.classes)
    pos = {c: j for j, c in enumerate(ctx.classes)}
    out_idx = np.array([int(ctx.class_index.get(c, -1)) for c in ctx.classes], dtype=np.int64)
    lut = np.full(max(int(out_idx.max(initial=-1)) + 1, 1), -1, np.int64)
    lut[out_idx[out_idx >= 0]] = np.flatnonzero(out_idx >= 0)

    if "top5" in ctx.table.columns and "top5_prob" in ctx.table.columns:
        T, Q = _ragged(ctx.table["top5"], -1, np.int64), _ragged(ctx.table["top5_prob"], 0.0, np.float64)
    else:  # older scans: only the prediction is known besides the label
        T = ctx.table["pred"].astype(str).map(ctx.class_index).fillna(-1).to_numpy(np.int64)[:, None]
        Q = ctx.col("confidence")[:, None]
    cols = np.where((T >= 0) & (T < len(lut)), lut[np.clip(T, 0, len(lut) - 1)], -1)
    P = np.zeros((n, K))
    known = np.zeros((n, K), bool)
    for k in range(T.shape[1]):
        r = np.flatnonzero(cols[:, k] >= 0)
        P[r, cols[r, k]] = Q[r, k]
        known[r, cols[r, k]] = True
    lab = np.array([pos.get(c, -1) for c in ctx.strings("label")])
    label_prob = ctx.col("label_prob")
    has = (lab >= 0) & np.isfinite(label_prob)
    r = np.flatnonzero(has)
    mass = np.nansum(Q, axis=1) + np.where(has & ~known[np.arange(n), np.clip(lab, 0, None)],
                                           np.nan_to_num(label_prob), 0.0)
    P[r, lab[r]] = label_prob[r]  # the exact value beats the top-5 copy (identical anyway)
    known[r, lab[r]] = True
    n_unknown = (~known).sum(axis=1)
    fill = np.clip(1.0 - mass, 0.0, None) / np.maximum(n_unknown, 1)
    P = np.where(known, P, fill[:, None])
    return np.clip(P, 0.0, 1.0)


def _ragged(col, pad, dtype) -> np.ndarray:
    rows = [np.asarray(v, dtype=dtype).ravel() if v is not None else np.zeros(0, dtype) for v in col]
    m = max((len(v) for v in rows), default=0)
    out = np.full((len(rows), m), pad, dtype=dtype)
    for i, v in enumerate(rows):
        out[i, : len(v)] = v
    return out


def confident_learning(P: np.ndarray, labels: np.ndarray):
    """Per-image ``(issue, suggested)`` from probabilities ``P`` (N, K) and label positions.

    ``suggested`` is the position of the likely true class (-1 where no class passes its
    threshold); ``issue`` is ``suggested not in (-1, label)``. Also returns the thresholds.
    """
    n, K = P.shape
    t = np.full(K, np.inf)  # a class nobody is labelled with is never suggested
    for j in range(K):
        m = labels == j
        if m.any():
            t[j] = P[m, j].mean()
    above = P >= t[None, :] - 1e-6  # the tolerance cleanlab uses for float ties
    suggested = np.where(above.any(axis=1), np.argmax(np.where(above, P, -np.inf), axis=1), -1)
    issue = (suggested >= 0) & (suggested != labels) & (labels >= 0)
    return issue, suggested, t


def _round_preserving_sum(x: np.ndarray) -> np.ndarray:
    """Round to integers keeping the (rounded) sum: cleanlab's ``round_preserving_sum``."""
    x = np.asarray(x, np.float64)
    ints = x.round()
    target = np.round(x.sum())
    while abs(target - ints.sum()) > 1e-6:
        diff = np.round(target - ints.sum())
        step = -1 if diff < 0 else 1
        changes = min(int(abs(diff)), len(x))
        for j in np.argsort(x - ints)[::-step][:changes]:
            ints[j] += step
    return ints


def prune_by_class(P: np.ndarray, labels: np.ndarray):
    """Confident learning's ``prune_by_class`` filter; per-image ``(issue, suggested)`` and the
    per-class thresholds.

    As ``cleanlab.filter.find_label_issues(filter_by="prune_by_class")``: the confident joint
    ``C[i, j]`` counts the images labelled i whose confident class (see
    :func:`confident_learning`) is j (diagonal at least 1), calibrated so that row i sums to the
    number of images labelled i and rounded keeping the row totals; in every class i the
    ``n_i - C[i, i]`` images labelled i with the lowest ``p_i`` are issues, except those whose
    most probable class is their label. Unlike the plain rule it does not need the suggested
    class to pass its own threshold, only the *count* of issues comes from the confident
    images. ``suggested`` is the confident class where there is one, else the most probable
    class other than the label.
    """
    n, K = P.shape
    labels = np.asarray(labels)
    ok = labels >= 0
    _, conf_class, t = confident_learning(P, labels)
    counts = np.bincount(labels[ok], minlength=K).astype(np.float64)
    C = np.zeros((K, K))
    has = ok & (conf_class >= 0)
    np.add.at(C, (labels[has], conf_class[has]), 1.0)
    np.fill_diagonal(C, np.maximum(np.diagonal(C), 1.0))
    issue = np.zeros(n, bool)
    for i in range(K):
        rows = np.flatnonzero(labels == i)
        if rows.size <= 1:
            continue
        row = _round_preserving_sum(C[i] / C[i].sum() * counts[i])
        m = int(counts[i] - row[i])
        if m >= 1:
            # lowest p_i first; ties (common with kNN shares) by the largest other class
            other_max = np.max(np.delete(P[rows], i, axis=1), axis=1, initial=0.0)
            issue[rows[np.lexsort((-other_max, P[rows, i]))[:m]]] = True
    # not an issue where the label is (one of) the most probable class(es)
    bonus = P.copy()
    bonus[np.flatnonzero(ok), labels[ok]] += 1e-6
    issue &= ok & (bonus.argmax(axis=1) != labels)
    other = np.where(np.arange(K)[None, :] == labels[:, None], -np.inf, P)
    suggested = np.where((conf_class >= 0) & (conf_class != labels), conf_class, other.argmax(axis=1))
    return issue, suggested, t


def embed_for_knn(features: np.ndarray, *, max_dims: int = 128, seed: int = 0) -> np.ndarray:
    """Rows of ``features`` ready for cosine kNN: ``sign(x) sqrt|x|``, L2-normalised, and reduced
    to ``max_dims`` principal components (then re-normalised) when wider."""
    X = np.asarray(features, np.float64)
    X = np.sign(X) * np.sqrt(np.abs(X))
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    if X.shape[1] > max_dims and X.shape[0] > max_dims:
        from sklearn.decomposition import PCA

        X = PCA(n_components=max_dims, random_state=seed).fit_transform(X)
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


#: Above this many objects the look-alikes are searched among a seeded sample of this many
#: (brute-force kNN is O(n^2): 6 s for 50,000 objects on 2 cores, hours at 1,000,000); every
#: object still gets its own k nearest, from the sample.
KNN_REFERENCE_MAX = 20_000


def knn_probabilities(X: np.ndarray, labels: np.ndarray, n_classes: int, k: int, *,
                      max_reference: int = KNN_REFERENCE_MAX, seed: int = 0):
    """Leave-one-out kNN class shares ``(P, neighbours)``: ``P[i, j]`` is the share of row i's
    ``k`` nearest other rows (Euclidean on unit rows = cosine) labelled j; ``neighbours`` (n, k)
    their row positions, nearest first. ``k`` is capped at n - 1. With more than
    ``max_reference`` rows the neighbours are taken from a seeded sample of that many rows."""
    from sklearn.neighbors import NearestNeighbors

    n = len(X)
    k = max(1, min(int(k), n - 1))
    ref = np.arange(n)
    if n > max_reference:
        ref = np.sort(np.random.default_rng([int(seed), 31]).choice(n, int(max_reference), replace=False))
        k = min(k, len(ref) - 1)
    nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(X[ref])
    idx = np.concatenate([ref[nn.kneighbors(X[i:i + 50_000], return_distance=False)]
                          for i in range(0, n, 50_000)])
    # drop each row itself (exact duplicates may come first in either order); a row whose k + 1
    # nearest do not include itself keeps its first k
    keep = idx != np.arange(n)[:, None]
    keep &= np.cumsum(keep, axis=1) <= k
    neighbours = idx[keep].reshape(n, k)
    lab = np.asarray(labels)[neighbours]
    P = np.stack([(lab == j).mean(axis=1) for j in range(n_classes)], axis=1)
    return P, neighbours


@register
class LabelIssue(Detector):
    name = kind = "label_issue"
    scope = "image"
    description = "Probable label errors by confident learning, with the labelled class's CAM as evidence."

    def run(self, ctx: Context) -> DetectorResult:
        if "label_prob" not in ctx.table.columns or not np.isfinite(ctx.col("label_prob")).any():
            return DetectorResult.skip("the scan table has no label_prob column")
        if len(ctx.classes) < 2:
            return DetectorResult.skip("a single class: there is no other label to suggest")
        K = len(ctx.classes)
        pos = {c: j for j, c in enumerate(ctx.classes)}
        lab = np.array([pos.get(c, -1) for c in ctx.strings("label")])
        P_model = class_probabilities(ctx)
        P = P_model.copy()
        issue = np.zeros(ctx.n, bool)
        suggested = np.full(ctx.n, -1)
        t_view = np.full((ctx.n, K), np.nan)  # per image, the thresholds of its view
        view = np.full(ctx.n, "model", dtype=object)
        neighbours = None  # (n, k) row positions of each object-view image's look-alikes

        obj = self._object_rows(ctx, lab)
        k = int(ctx.options["label_knn"])
        fg_pred = self._only_fg_positions(ctx)
        pred_pos = np.array([pos.get(c, -1) for c in ctx.strings("pred")])
        explained = self._explained(ctx)
        agreement = None
        if obj.size:
            X = embed_for_knn(ctx.object_embedding[obj])
            P_obj, nb = knn_probabilities(X, lab[obj], K, k)
            _, sug, t = prune_by_class(P_obj, lab[obj])
            lo = lab[obj]
            p_given = P_obj[np.arange(obj.size), lo]
            # How far the object view can be trusted: the share of objects whose look-alikes
            # mostly carry their own label (leave-one-out). A model that learnt a shortcut may
            # embed shapes poorly; below the floor the model's prediction must confirm too.
            agreement = float(np.mean(P_obj.argmax(axis=1) == lo))
            # An issue: at most label_max_share of the object's look-alikes carry its label
            # (1 of 20), and the model reading the object alone (Only-FG) does not say the label
            # either.
            # A correctly labelled but unusual object is usually still read as its label.
            # A second reading, the model's own prediction, disagreeing with the label (and no
            # shortcut explaining it) lets a share of up to label_max_share_confirmed pass.
            confirmed = (pred_pos[obj] != lo) & ~explained[obj]
            share = np.where(confirmed, float(ctx.options["label_max_share_confirmed"]),
                             float(ctx.options["label_max_share"]))
            iss = (p_given <= share + 1e-9) & (fg_pred[obj] != lo)
            if agreement < float(ctx.options["label_min_agreement"]):
                iss &= (pred_pos[obj] != lo) & ~explained[obj]
            fg_sug = (fg_pred[obj] >= 0) & (fg_pred[obj] != lo)
            sug = np.where(fg_sug & (P_obj[np.arange(obj.size), np.maximum(fg_pred[obj], 0)] > 0),
                           fg_pred[obj], sug)
            P[obj], issue[obj], suggested[obj], t_view[obj] = P_obj, iss, sug, t
            view[obj] = "object"
            neighbours = np.full((ctx.n, nb.shape[1]), -1, np.int64)
            neighbours[obj] = obj[nb]
        rest = np.setdiff1d(np.flatnonzero(lab >= 0), obj)
        gated = np.zeros(ctx.n, bool)
        if rest.size:
            iss, sug, t = confident_learning(P_model[rest], lab[rest])
            iss &= ~ctx.correct[rest]  # cleanlab: never an issue when the model agrees
            iss &= ~explained[rest]  # a shortcut's victim, not a wrong label
            # a class the model recognises only through a shortcut (hiding a Clever-Hans
            # cluster's spot changes most of its predictions): the model's probabilities say
            # nothing about whether an image labelled so is one
            blind = self._shortcut_only_classes(ctx)
            if blind:
                iss &= ~np.isin(lab[rest], [pos[c] for c in blind if c in pos])
            issue[rest], suggested[rest], t_view[rest] = iss, sug, t
            # Attention gate (where the image has a mask): a wrong label leaves the labelled
            # class without evidence on the object, while a shortcut mistake (an object of
            # class c read as d from its background) still shows c's evidence on the object.
            # An all-zero labelled-class CAM (NaN lift) counts as no evidence.
            if "lift_true" in ctx.table.columns and "mask_frac" in ctx.table.columns:
                has_mask = np.isfinite(ctx.col("mask_frac"))
                on_object = ctx.col("lift_true") >= float(ctx.options["label_max_lift"])
                gated[rest] = issue[rest] & has_mask[rest] & on_object[rest]
                issue &= ~gated

        rows_ = np.arange(ctx.n)
        p_label = np.where(lab >= 0, P[rows_, np.clip(lab, 0, None)], np.nan)
        scores = np.clip(1.0 - p_label, 0.0, 1.0)
        p_model_given = P_model[rows_, np.clip(lab, 0, None)]
        ratio = self._label_cam_ratio(ctx)
        weak_thr = float(ctx.options["label_cam_weak"])

        notes = {"object": f"shares of the {k} most similar objects (object embeddings, "
                           "background removed)",
                 "model": "the model's probabilities"}
        findings = []
        rows_all = np.flatnonzero(issue)
        # one finding per labelled class (root cause first: one per class and cause), its
        # (given, suggested) pairs as evidence
        for gi in sorted({int(lab[i]) for i in rows_all}):
            rows = rows_all[lab[rows_all] == gi]
            given = ctx.classes[gi]
            sj_rows = suggested[rows]
            margin = np.clip(P[rows, sj_rows] - p_label[rows], 0.0, 1.0)
            n_class = int((lab == gi).sum())
            rate = len(rows) / n_class
            weak = ratio[rows] < weak_thr  # NaN (no CAMs) compares False
            ranked = rows[np.argsort(-margin, kind="stable")][:50]
            per_image = [self._image_evidence(ctx, i, gi, int(suggested[i]), P, P_model, view,
                                              neighbours, lab, ratio, weak_thr) for i in ranked]
            pairs = []
            for sj in sorted(set(sj_rows.tolist()), key=lambda j: (-(sj_rows == j).sum(), j)):
                r = rows[sj_rows == sj]
                pairs.append({
                    "suggested": ctx.classes[sj], "n": int(len(r)),
                    "threshold_given": float(np.nanmean(t_view[r, gi])),
                    "threshold_suggested": float(np.nanmean(t_view[r, sj])),
                    "mean_p_given": float(p_label[r].mean()),
                    "mean_p_suggested": float(P[r, sj].mean()),
                    "mean_model_p_given": float(p_model_given[r].mean()),
                    "mean_model_p_suggested": float(P_model[r, sj].mean()),
                    "n_set_aside_label_seen_on_object": int((gated & (lab == gi) & (suggested == sj)).sum())})
            views = sorted(set(view[rows]))
            looks = ", ".join(f"'{p['suggested']}' {p['n']}" for p in pairs)
            findings.append(self.finding(
                # 5% of a class probably mislabelled (or more) counts fully, weighted by how
                # clearly the evidence prefers the suggested class (mean p_suggested - p_given).
                severity=min(1.0, rate / 0.05) * float(margin.mean()),
                title=(f"{len(rows)} image(s) labelled '{given}' look like '{pairs[0]['suggested']}'"
                       if len(pairs) == 1 else
                       f"{len(rows)} image(s) labelled '{given}' look like another class ({looks})"),
                class_=given, scope="class",
                evidence={"given": given, "suggested": pairs[0]["suggested"], "n": len(rows),
                          "n_class": n_class, "rate": rate, "views": views,
                          "view_note": {v: notes[v] for v in views}, "pairs": pairs,
                          "mean_p_given": float(p_label[rows].mean()),
                          "mean_p_suggested": float(P[rows, sj_rows].mean()),
                          "n_label_cam_weak": int(weak.sum()),
                          "n_set_aside_label_seen_on_object": int((gated & (lab == gi)).sum()),
                          "label_cam_available": bool(np.isfinite(ratio[rows]).any()),
                          "images": per_image},
                examples=ctx.examples(rows, order=margin),
            ))
        n_expl = int((explained & (lab >= 0)).sum())
        for f in findings:
            f.evidence["object_view_agreement"] = agreement
            f.evidence["n_explained_by_shortcut_excluded"] = n_expl
        return DetectorResult(scores=scores, flags=issue, findings=findings)

    @staticmethod
    def _shortcut_only_classes(ctx: Context) -> list:
        """Classes with a causal Clever-Hans cluster (:func:`biasscope.causal.is_causal`) whose
        spot, hidden, changes at least half of all the class's tested predictions."""
        from biasscope.causal import causal_clusters

        out = [cl["class"] for cl, t in causal_clusters(ctx.analysis.get("clusters"), ctx.occlusion,
                                                        ctx.options)
               if cl is not None and t.get("changed") and np.mean(t["changed"]) >= 0.5]
        return sorted(set(out))

    @staticmethod
    def _only_fg_positions(ctx: Context) -> np.ndarray:
        """Per table row, the class position of the Only-FG prediction (-1 where none)."""
        out = np.full(ctx.n, -1, np.int64)
        cf = ctx.counterfactuals or {}
        pi = cf.get("per_image") or {}
        if not pi.get("index") or "only_fg_pred" not in pi:
            return out
        from biasscope.attractors import index_positions

        lut = {int(ctx.class_index[c]): j for j, c in enumerate(ctx.classes)}
        fg = np.array([lut.get(int(p), -1) for p in pi["only_fg_pred"]], np.int64)
        idx = ctx.table["index"].to_numpy(np.int64) if "index" in ctx.table.columns else np.arange(ctx.n)
        at = index_positions(np.asarray(pi["index"], np.int64), idx)
        return np.where(at >= 0, fg[np.maximum(at, 0)], -1)

    @staticmethod
    def _explained(ctx: Context) -> np.ndarray:
        """Rows whose prediction a shortcut explains: predicted as an attractor class (a
        ``spurious_feature`` by its detector's rule) while their own background is read as
        it, or changed by occluding the hot spot of a Clever-Hans cluster they belong to."""
        from biasscope.attractors import explained_by_attractor

        out = np.zeros(ctx.n, bool)
        row_of = ctx.row_of_index()
        att = ctx.attractors
        if att is not None:
            from .spurious_feature import attracting_classes

            names = attracting_classes(ctx)
            res = explained_by_attractor(ctx.counterfactuals,
                                         {c: int(ctx.class_index[c]) for c in names})
            for i in (res or {}).get("images", {}):
                if int(i) in row_of:
                    out[row_of[int(i)]] = True
        from biasscope.causal import causal_clusters

        for _, t in causal_clusters(ctx.analysis.get("clusters"), ctx.occlusion, ctx.options):
            for i, ch in zip(t.get("index", []), t.get("changed", [])):
                if ch and int(i) in row_of:
                    out[row_of[int(i)]] = True
        return out

    @staticmethod
    def _object_rows(ctx: Context, lab: np.ndarray) -> np.ndarray:
        """Rows that get the object view: a finite embedding and a dataset label, when there
        are enough of them (more than ``label_knn`` and two labelled classes)."""
        e = ctx.object_embedding
        if e is None:
            return np.zeros(0, np.int64)
        rows = np.flatnonzero(np.isfinite(e).all(axis=1) & (lab >= 0))
        if rows.size <= int(ctx.options["label_knn"]) or np.unique(lab[rows]).size < 2:
            return np.zeros(0, np.int64)
        return rows

    @staticmethod
    def _image_evidence(ctx, i, gi, sj, P, P_model, view, neighbours, lab, ratio, weak_thr) -> dict:
        ev = {"path": str(ctx.paths[i]), "suggested": ctx.classes[sj], "view": str(view[i]),
              "p_given": float(P[i, gi]),
              "p_suggested": float(P[i, sj]), "model_p_given": float(P_model[i, gi]),
              "model_p_suggested": float(P_model[i, sj]), "label_cam_ratio": float(ratio[i]),
              "label_cam_weak": bool(ratio[i] < weak_thr)}
        if view[i] == "object":
            nb = neighbours[i]
            ev["nearest_with_suggested_label"] = [str(p) for p in ctx.paths[nb[lab[nb] == sj][:3]]]
        return ev

    @staticmethod
    def _label_cam_ratio(ctx: Context) -> np.ndarray:
        """Mass of the labelled class's CAM over the predicted class's (NaN when unknown)."""
        if ctx.heatmaps is None or ctx.heatmaps_true is None:
            return np.full(ctx.n, np.nan)
        m_pred = np.asarray(ctx.heatmaps, np.float32).reshape(ctx.n, -1).sum(axis=1, dtype=np.float64)
        m_true = np.asarray(ctx.heatmaps_true, np.float32).reshape(ctx.n, -1).sum(axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(m_pred > 0, m_true / m_pred, np.nan)
