"""Attractor analysis: which class a spurious feature pulls other classes' predictions *to*.

A shortcut has a winner and losers. When a feature of the images (a texture, a mark, a frame, a
colour cast) makes the model say class S, the images that suffer are *other* classes' images
carrying the feature: they are predicted S. Per-class tests (BG-gap, group accuracy) see the
losers -- their accuracy drops -- and so blame the victims; this module names the winner.

It reads the counterfactual pass (:func:`biasscope.counterfactuals.run_counterfactuals`): every
object was pasted onto the Only-BG images (object removed) of other images, ``draws`` times,
and each version's prediction is known. For every class S:

* **featured backgrounds** ``F_S``: the backgrounds whose Only-BG image the model itself reads
  as S -- whatever the feature is, the model finds S in the background alone;
* **attraction**: among Mixed-Rand draws that put an object of another class onto the
  background of an image of a third class (neither the object's class nor S, so no remnant of
  an S object can be what pulls), leaving out objects that alone (Only-FG, on grey) are already
  predicted S (their S comes from their shape: a class the model can only tell apart by its
  shortcut is otherwise taken for the attractor of its look-alikes), the share predicted S on featured backgrounds (``rate_in``)
  minus the share on the others (``rate_out``). A clean model reads the pasted object whatever
  the background says, so the two are close; a model with a shortcut to S follows the
  background. 95% CI: percentile bootstrap resampling *background images* (the draws on one
  background are not independent);
* the **pulled share**: the share of featured backgrounds among all times the pull there, i.e.
  the expected share of other classes' objects that a background drawn from the data sends to
  S -- how much of the data the feature affects;
* the **Only-FG** baseline ``fg_rate``: how often other classes' objects alone (on grey) are
  predicted S -- the part of "predicted S" that the objects' shapes explain;
* the **victims**: per object class, how many of its draws on featured backgrounds went to S,
  and how many of its *original* images were predicted S while their own background reads as S
  (``n_victims_original``: mistakes in the data set the feature explains);
* per attribute value of the background's image (e.g. ``background=grass``), the share of
  draws predicted S: the most attracting backgrounds.

Numpy only; deterministic in ``seed``.
"""

from __future__ import annotations

import numpy as np

from .stats import boot_ratio, interval

__all__ = ["attractor_stats", "explained_by_attractor", "find_attractors", "index_positions"]


def _per_image(cf: dict) -> dict | None:
    pi = (cf or {}).get("per_image") or {}
    if cf is None or cf.get("skipped") or not pi.get("index"):
        return None
    n = len(pi["index"])
    out = {k: np.asarray(pi[k], np.int64) for k in ("index", "label_idx", "orig_pred", "only_bg_pred")}
    out["only_fg_pred"] = np.asarray(pi.get("only_fg_pred", [-1] * n), np.int64)
    # the stratified sample (Only-BG on all of it; outside it only on the mistakes, -1 elsewhere)
    out["in_sample"] = np.asarray(pi.get("in_sample", [True] * n), bool)
    if pi.get("mixed_pred_all") is not None:
        out["mixed"] = np.asarray(pi["mixed_pred_all"], np.int64).reshape(n, -1)
        out["src"] = np.asarray(pi["bg_source_index_all"], np.int64).reshape(n, -1)
    else:
        out["mixed"] = np.asarray(pi["mixed_pred"], np.int64)[:, None]
        out["src"] = np.asarray(pi["bg_source_index"], np.int64)[:, None]
    out["path"] = np.asarray(pi.get("path", [f"#{i}" for i in pi["index"]]), dtype=object)
    return out


def index_positions(index: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row positions of dataset indices ``ids`` in ``index`` (-1 where absent)."""
    order = np.argsort(index, kind="stable")
    srt = index[order]
    at = np.clip(np.searchsorted(srt, ids), 0, max(len(srt) - 1, 0))
    if not len(srt):
        return np.full(np.shape(ids), -1, np.int64)
    return np.where(srt[at] == ids, order[at], -1).astype(np.int64)


def attractor_stats(cf: dict | None, class_index: dict, *, attributes: dict | None = None,
                    seed: int = 0, n_boot: int = 1000, max_examples: int = 10) -> dict | None:
    """Per class S (name), the attraction figures described in the module docstring.

    Parameters
    ----------
    cf : the counterfactual result (``per_image`` is read); None or skipped -> None.
    class_index : class name -> output index (the classes analysed).
    attributes : optional {attribute name: {dataset index: value}} of the images.

    Returns
    -------
    {"classes": {S: figures}, "n_draws": int} or None without usable counterfactuals.
    """
    pi = _per_image(cf)
    if pi is None:
        return None
    n, R = pi["mixed"].shape
    index, label, ob = pi["index"], pi["label_idx"], pi["only_bg_pred"]
    src = index_positions(index, pi["src"])
    ok = (pi["mixed"] >= 0) & (src >= 0)
    src_c = np.maximum(src, 0)
    obj_lab = np.broadcast_to(label[:, None], src.shape)
    src_lab = label[src_c]
    src_ob = ob[src_c]
    pred = pi["mixed"]
    obj_fg = np.broadcast_to(pi["only_fg_pred"][:, None], src.shape)
    out = {}
    attr_values = {attr: np.array([str(values.get(int(i), "")) for i in index], dtype=object)
                   for attr, values in (attributes or {}).items()}
    for name, s in class_index.items():
        s = int(s)
        rng = np.random.default_rng([int(seed), s, 77])
        # objects that alone (Only-FG) already look like S are left out: their S is the shape's
        D = ok & (obj_lab != s) & (src_lab != s) & (obj_lab != src_lab) & (obj_fg != s)
        hit = D & (pred == s)
        feat_draw = D & (src_ob == s)
        # per background source: hits and totals of its draws
        srcs = np.unique(src_c[D]) if D.any() else np.zeros(0, np.int64)
        tot = np.bincount(src_c[D], minlength=n).astype(np.float64)
        hits = np.bincount(src_c[hit], minlength=n).astype(np.float64)
        in_src = srcs[ob[srcs] == s]
        out_src = srcs[ob[srcs] != s]
        n_in, n_out = float(tot[in_src].sum()), float(tot[out_src].sum())
        rate_in = float(hits[in_src].sum() / n_in) if n_in else None
        rate_out = float(hits[out_src].sum() / n_out) if n_out else None
        b_in = boot_ratio(hits[in_src], tot[in_src], n_boot, rng)
        b_out = boot_ratio(hits[out_src], tot[out_src], n_boot, rng)
        other = label != s
        fg_ok = other & (pi["only_fg_pred"] >= 0)
        fg_rate = float(np.mean(pi["only_fg_pred"][fg_ok] == s)) if fg_ok.any() else None
        # victims: draws on featured backgrounds that went to S, by object class
        vict_draws = feat_draw & hit
        victims = {}
        for c_name, c in class_index.items():
            if int(c) == s:
                continue
            k = int((vict_draws & (obj_lab == int(c))).sum())
            m = int((feat_draw & (obj_lab == int(c))).sum())
            orig = int(((label == int(c)) & (ob == s) & (pi["orig_pred"] == s)).sum())
            if k or orig:
                victims[c_name] = {"n_draws_to_class": k, "n_draws_featured": m,
                                   "n_victims_original": orig}
        # originals: other-class images predicted S with and without their own background read as
        # S (rates on the sample, where every image has an Only-BG prediction; the victims below
        # are mistakes, and every mistake has one)
        own_feat = other & (ob == s)
        smp = other & pi["in_sample"] & (ob >= 0)
        feat_s, plain_s = smp & (ob == s), smp & (ob != s)
        orig_in = float(np.mean(pi["orig_pred"][feat_s] == s)) if feat_s.any() else None
        orig_out = float(np.mean(pi["orig_pred"][plain_s] == s)) if plain_s.any() else None
        per_value = {}
        for attr, v_src in attr_values.items():
            rows = {}
            for v in sorted(set(v_src[srcs].tolist())):
                sel = srcs[v_src[srcs] == v]
                t = float(tot[sel].sum())
                if t >= 20:
                    rows[v] = {"rate": float(hits[sel].sum() / t), "n_draws": int(t)}
            if rows:
                per_value[attr] = dict(sorted(rows.items(), key=lambda kv: -kv[1]["rate"]))
        share = hits[in_src] / np.maximum(tot[in_src], 1)
        top_src = in_src[np.argsort(-share, kind="stable")][:max_examples]
        vrows = np.flatnonzero(own_feat & (pi["orig_pred"] == s))
        out[name] = {
            "output_index": s,
            "n_draws": int(D.sum()), "n_draws_featured": int(n_in),
            "n_featured_backgrounds": int(in_src.size), "n_backgrounds": int(srcs.size),
            "n_comparison_backgrounds": int(out_src.size),
            # expected share of other classes' objects pulled to S on a background drawn
            # from the data: the share of featured backgrounds times the pull there
            "pulled_share": (float(n_in / (n_in + n_out)) * rate_in
                             if rate_in is not None and n_in + n_out > 0 else None),
            "featured_share": float(in_src.size / srcs.size) if srcs.size else None,
            "rate_in": rate_in, "rate_in_ci": interval(b_in),
            "rate_out": rate_out, "rate_out_ci": interval(b_out),
            "attraction": (rate_in - rate_out) if rate_in is not None and rate_out is not None else None,
            "attraction_ci": interval(b_in - b_out) if b_in is not None and b_out is not None else None,
            "fg_rate": fg_rate,
            "orig_rate_featured": orig_in, "orig_rate_plain": orig_out,
            "n_other_featured": int(feat_s.sum()), "n_other": int(smp.sum()),
            "n_victims_original": int(vrows.size),
            "victims": victims,
            "per_attribute": per_value,
            "examples_backgrounds": [str(p) for p in pi["path"][top_src]],
            "examples_victims": [str(p) for p in pi["path"][vrows[:max_examples]]],
            "victim_index": index[vrows].tolist(),
        }
    return {"classes": out, "n_draws": int(ok.sum()), "n_images": int(n),
            "method": ("Mixed-Rand draws of an object of class c onto the Only-BG image of an "
                       "image of a third class; featured backgrounds: those whose Only-BG image "
                       "is predicted S; attraction = P(S | featured) - P(S | other backgrounds); "
                       "95% percentile bootstrap over background images")}


def explained_by_attractor(cf: dict | None, attractor_classes: dict, *, own=()) -> dict | None:
    """Per image (dataset index), the attractor class that explains its wrong prediction:
    predicted S while its own background is read as S, for S in ``attractor_classes``
    (name -> output index); and, for the attractors named in ``own`` (those shown to depend on
    their background), S's own images missed while their background is *not* read as S (S
    without its feature). Also per (object class) the share of its Mixed-Rand flips that went
    to an attractor on a background read as that attractor.

    Returns ``{"images": {dataset index: S name}, "flips": {class output index: {"n_flips",
    "n_explained"}}}`` or None without counterfactuals.
    """
    pi = _per_image(cf)
    if pi is None:
        return None
    by_idx = {int(v): k for k, v in attractor_classes.items()}
    label, orig, ob = pi["label_idx"], pi["orig_pred"], pi["only_bg_pred"]
    images = {}
    for k in np.flatnonzero((orig != label) & (orig == ob) & np.isin(orig, list(by_idx))):
        images[int(pi["index"][k])] = by_idx[int(orig[k])]
    for name in own:
        s = int(attractor_classes[name])
        for k in np.flatnonzero((label == s) & (orig != s) & (ob >= 0) & (ob != s)):
            images.setdefault(int(pi["index"][k]), name)
    src = index_positions(pi["index"], pi["src"])
    ok = (pi["mixed"] >= 0) & (src >= 0)
    src_ob = ob[np.maximum(src, 0)]
    correct = (orig == label)[:, None]
    flip = ok & correct & (pi["mixed"] != label[:, None])
    expl = flip & np.isin(pi["mixed"], list(by_idx)) & (src_ob == pi["mixed"])
    flips = {}
    for c in np.unique(label):
        m = label == c
        flips[int(c)] = {"n_flips": int(flip[m].sum()), "n_explained": int(expl[m].sum())}
    return {"images": images, "flips": flips}


def find_attractors(cf: dict | None, class_index: dict, passes, **kw) -> dict | None:
    """:func:`attractor_stats` plus ``attractors``: the classes whose figures ``passes`` (a
    predicate on one class's figures), strongest first (lower CI bound of the attraction)."""
    res = attractor_stats(cf, class_index, **kw)
    if res is None:
        return None
    found = [c for c, f in res["classes"].items() if passes(f)]
    res["attractors"] = sorted(found, key=lambda c: (-res["classes"][c]["attraction_ci"][0], c))
    return res
