"""Causal tests of heatmap clusters by occlusion: which clusters to test and what the test says.

A SpRAy cluster whose heatmaps sit at one spot is a *suspect* (a watermark, a tag); attention
is correlation. The test: occlude the spot in the model input (:mod:`biasscope.occlusion`,
inside the compiled step) and count how many of the cluster's predictions change, and to which
class. A cluster of class S whose predictions collapse when a small area is hidden, while
other images hidden at the same place keep theirs, uses that area; when the members the model
got wrong (labelled c, predicted S) come back to c, the area is what pulled them to S -- a
Clever-Hans strategy with causal evidence, with or without masks.

This module is numpy only: :func:`plan` picks the clusters and rows (from the analysis),
:func:`summarise` turns :func:`biasscope.occlusion.run_occlusion`'s result into per-cluster
figures, and :func:`is_causal` is the rule the detectors share.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["plan", "summarise", "is_causal", "causal_clusters", "wilson"]

#: At most this many clusters are tested, largest first; members and controls are sampled.
MAX_CLUSTERS = 8
MAX_MEMBERS = 256
MAX_CONTROLS = 128


def wilson(k: int, n: int, z: float = 1.96) -> list | None:
    """Wilson 95% interval of the proportion k / n."""
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def candidates(clusters, options: dict) -> list:
    """Clusters at one spot (half of the mean heatmap in at most ``cluster_hot_area`` of the
    image, members' centres within ``cluster_jitter``) large enough to be a strategy."""
    class_n: dict = {}
    for cl in clusters or []:
        class_n[cl["class"]] = class_n.get(cl["class"], 0) + int(cl["size"])
    out = []
    for cl in clusters or []:
        size = int(cl["size"])
        min_size = max(int(options["cluster_min_size"]), options["cluster_min_share"] * class_n[cl["class"]])
        hot, jit = cl.get("hot_area"), cl.get("centroid_jitter")
        if size < min_size or hot is None or jit is None or cl.get("mean_heatmap") is None:
            continue
        if hot <= options["cluster_hot_area"] and jit <= options["cluster_jitter"]:
            out.append(cl)
    out.sort(key=lambda cl: (-int(cl["size"]), int(cl["id"])))
    return out[:MAX_CLUSTERS]


def plan(analysis: dict, table, image_size, options: dict, *, seed: int = 0) -> list:
    """Occlusion tests for :func:`biasscope.occlusion.run_occlusion`: per candidate cluster,
    ``{"id": "c<id>", "cluster": id, "rows": dataset rows of members, then the class's other
    predictions, then controls (other classes' predictions), "n_members", "n_rest",
    "region": bool (H, W)}``."""
    from .occlusion import region_from_heatmap  # noqa: PLC0415 (TensorFlow only when used)

    if "cluster" not in table.columns:
        return []
    cl_col = table["cluster"].astype("Float64").fillna(-1).to_numpy(np.float64).astype(np.int64)
    idx = table["index"].to_numpy(np.int64)
    pred = table["pred"].astype(str).to_numpy()
    tests = []
    for cl in candidates(analysis.get("clusters"), options):
        rng = np.random.default_rng([int(seed), int(cl["id"]), 11])
        mem = np.flatnonzero(cl_col == int(cl["id"]))
        if mem.size > MAX_MEMBERS:
            mem = np.sort(rng.choice(mem, MAX_MEMBERS, replace=False))
        rest = np.setdiff1d(np.flatnonzero((pred == cl["class"]) & (cl_col != int(cl["id"]))), mem)
        if rest.size > MAX_MEMBERS:
            rest = np.sort(rng.choice(rest, MAX_MEMBERS, replace=False))
        ctrl = np.flatnonzero(pred != cl["class"])
        if ctrl.size > MAX_CONTROLS:
            ctrl = np.sort(rng.choice(ctrl, MAX_CONTROLS, replace=False))
        region = region_from_heatmap(np.asarray(cl["mean_heatmap"], np.float64), image_size,
                                     mass=0.5, grow=1)
        tests.append({"id": f"c{int(cl['id'])}", "cluster": int(cl["id"]),
                      "rows": np.concatenate([idx[mem], idx[rest], idx[ctrl]]),
                      "n_members": int(mem.size), "n_rest": int(rest.size), "region": region})
    return tests


def summarise(tests: list, result: dict, table, class_index: dict) -> dict:
    """Per cluster id (str): the change rates of members, of the rest of the class and of
    controls, where members moved, how many wrong members came back to their label; plus, per
    tested prediction of the class, dataset ``index`` and ``changed`` (lists), for the
    detectors (a victim predicted S elsewhere than in the cluster is explained by the spot as
    well when hiding it changes the prediction)."""
    names = {int(v): k for k, v in class_index.items()}
    row_of = {int(v): i for i, v in enumerate(table["index"].to_numpy(np.int64))}
    label_idx = table["label_idx"].to_numpy(np.int64) if "label_idx" in table.columns else None
    out = {}
    for t in tests:
        r = result["tests"].get(t["id"])
        if r is None:
            continue
        rows = np.asarray(r["rows"], np.int64)
        orig, occ = np.asarray(r["orig_pred"], np.int64), np.asarray(r["occluded_pred"], np.int64)
        # members first, then the rest of the class's predictions, then controls (order kept)
        is_mem = np.zeros(rows.size, bool)
        is_mem[: min(t["n_members"], rows.size)] = True
        is_cls = np.zeros(rows.size, bool)
        is_cls[: min(t["n_members"] + t.get("n_rest", 0), rows.size)] = True
        ch = orig != occ
        m, c = is_mem, ~is_cls
        k, n = int(ch[m].sum()), int(m.sum())
        lab = np.array([label_idx[row_of[int(i)]] if label_idx is not None and int(i) in row_of
                        else -1 for i in rows[m]], np.int64)
        wrong = lab != orig[m]
        moved = {}
        for v in occ[m][ch[m]]:
            moved[names.get(int(v), f"#{int(v)}")] = moved.get(names.get(int(v), f"#{int(v)}"), 0) + 1
        out[str(t["cluster"])] = {
            "n": n, "n_changed": k, "changed_rate": k / n if n else None,
            "changed_ci": wilson(k, n),
            "n_control": int(c.sum()),
            "control_changed_rate": float(ch[c].mean()) if c.any() else None,
            "n_wrong": int(wrong.sum()),
            "n_repaired": int((wrong & (occ[m] == lab)).sum()),
            "repaired_share": float((wrong & (occ[m] == lab)).sum() / wrong.sum()) if wrong.any() else None,
            "moved_to": dict(sorted(moved.items(), key=lambda kv: -kv[1])),
            "region_share": float(r.get("region_share", np.mean(t["region"]))),
            "n_rest": int((is_cls & ~is_mem).sum()),
            "rest_changed_rate": float(ch[is_cls & ~is_mem].mean()) if (is_cls & ~is_mem).any() else None,
            # every tested prediction of the class (members and the rest): changed or not
            "index": rows[is_cls].tolist(), "changed": ch[is_cls].tolist(),
        }
    return out


def is_causal(t: dict | None, options: dict, *, off_object: bool = False) -> tuple[bool, float]:
    """(causal?, strength) of one cluster's occlusion figures.

    Causal when the lower Wilson bound of the members' change rate is at least
    ``occlusion_min_change``, the rate exceeds the controls' by ``occlusion_min_excess``, and
    the spot is shown not to be the object: with masks, the cluster attends off the object
    (``off_object``); without, at least 5 of its members are mistakes and half of those come
    back to their label when the spot is hidden. Strength ``min(1, excess / 0.4)`` with the
    excess taken from the lower bound (0.5 at the thresholds).
    """
    if not t or not t.get("n") or t.get("changed_ci") is None:
        return False, 0.0
    lo = float(t["changed_ci"][0])
    base = float(t.get("control_changed_rate") or 0.0)
    repaired = t.get("n_wrong", 0) >= 5 and (t.get("repaired_share") or 0.0) >= 0.5
    ok = (lo >= float(options["occlusion_min_change"]) - 1e-9
          and float(t["changed_rate"]) - base >= float(options["occlusion_min_excess"]) - 1e-9
          and (off_object or repaired))
    return ok, (float(min(1.0, max(lo - base, 0.0) / 0.4)) if ok else 0.0)


def causal_clusters(clusters, occlusion: dict | None, options: dict) -> list:
    """``(cluster, occlusion figures)`` of the tested clusters that :func:`is_causal` accepts
    (a cluster whose mean ``inside_frac`` is below ``off_object_inside`` is off the object)."""
    by_id = {str(cl["id"]): cl for cl in clusters or []}
    out = []
    for cid, t in ((occlusion or {}).get("clusters") or {}).items():
        cl = by_id.get(str(cid))
        off = cl is not None and cl.get("mean_inside_frac") is not None and \
            cl["mean_inside_frac"] < float(options["off_object_inside"])
        if is_causal(t, options, off_object=off)[0]:
            out.append((cl, t))
    return out
