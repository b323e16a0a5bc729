"""From a stored scan to what the report template and its JavaScript need.

:func:`build` returns three things: ``page`` (the template's context: tables, findings, cluster
cards, metadata; plain Python values, escaped by Jinja2), ``data`` (the JSON the report's
JavaScript reads: the rows column by column, the figure specs, class names) and ``thumbs`` (the
thumbnail data URIs, once per image, referenced by row from everywhere else).

Reads only the scan (``meta``, table, heatmaps, analysis, findings, summary) and, for
thumbnails, the image and mask files under the scan's data root.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from biasscope.analysis import class_order, class_stats, group_stats, infer_attributes, to_jsonable
from biasscope.findings.base import BANDS, severity_band

from . import figures
from .thumbnails import FULL_BELOW, choose_rows, heatmap_uri, mask_sources, start_thumbnails

#: Metrics shown per image (explorer, detail panel), in this order.
IMAGE_METRICS = ("inside_frac", "mask_frac", "lift", "pointing_hit", "energy_inside", "cam_entropy")
#: Rows of a group table before it is cut to the worst groups.
MAX_GROUP_ROWS = 300
#: Examples shown per finding and per cluster.
MAX_EXAMPLES = 10
CLUSTER_EXAMPLES = 3
#: Up to this many classes every class's cluster cards are open; above, only flagged ones.
OPEN_CLASSES = 12
#: Findings shown expanded (the rest are one line each until opened).
OPEN_FINDINGS = 5


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------


def _num(table: pd.DataFrame, name: str) -> np.ndarray:
    if name not in table.columns:
        return np.full(len(table), np.nan)
    return pd.to_numeric(table[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _rounded(a: np.ndarray, nd: int) -> list:
    a = np.round(np.asarray(a, np.float64), nd)
    return [None if not math.isfinite(v) else v for v in a.tolist()]


def _finite(x):
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_value(v) -> str:
    """A scalar for a table cell: counts with separators, floats to 4 significant digits."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not math.isfinite(f):
            return "–"
        if f == 0:
            return "0"
        return f"{f:.2e}" if abs(f) < 1e-3 or abs(f) >= 1e6 else f"{f:.4g}"
    return str(v)


# ----------------------------------------------------------------------------------------------
# evidence of a finding
# ----------------------------------------------------------------------------------------------


def _evidence_items(evidence: dict, row_of: dict) -> list[dict]:
    """The evidence dict as table rows: ``{key, kind, ...}`` with kind ``scalar`` (text),
    ``pairs`` (a dict shown inline), ``list`` (scalars joined) or ``table`` (a list of dicts:
    columns and rows, paths linked to the image's row)."""
    items = []
    for key, v in _flatten_tables(evidence or {}).items():
        if _is_map(v):  # a 2-D grid of numbers: a heatmap
            items.append({"key": key, "kind": "heatmap",
                          "uri": heatmap_uri(np.asarray(v, np.float64))})
        elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            # {name: {figures}}, e.g. victims per class: a table with the name first
            v = [{"": k, **{c: x for c, x in d.items() if not _is_map(x)}} for k, d in v.items()]
            items.append(_table(key, v, row_of))
        elif isinstance(v, dict):
            items.append({"key": key, "kind": "pairs",
                          "pairs": [(str(k), fmt_value(x) if not isinstance(x, (dict, list)) else str(x))
                                    for k, x in list(v.items())[:20]],
                          "more": max(0, len(v) - 20)})
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            items.append(_table(key, [{c: x for c, x in d.items() if not _is_map(x)} for d in v],
                                row_of))
        elif isinstance(v, list):
            items.append({"key": key, "kind": "scalar",
                          "text": ", ".join(fmt_value(x) for x in v[:20]) + (" …" if len(v) > 20 else "")})
        else:
            items.append({"key": key, "kind": "scalar", "text": fmt_value(v)})
    return items


def _is_map(v) -> bool:
    return (isinstance(v, list) and len(v) > 1 and all(isinstance(r, list) and len(r) > 1 for r in v)
            and all(isinstance(x, (int, float)) for r in v for x in r))


def _flatten_tables(evidence: dict) -> dict:
    """``{attr: {value: {figures}}}`` (e.g. per_attribute) one level down: ``attr`` keys
    ``"per_attribute.background"`` each holding ``{value: {figures}}``."""
    out = {}
    for key, v in evidence.items():
        if (isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())
                and all(isinstance(y, dict) for x in v.values() for y in x.values()) and
                any(x for x in v.values())):
            for k2, x in v.items():
                out[f"{key}.{k2}"] = x
        else:
            out[key] = v
    return out


def _table(key: str, v: list, row_of: dict) -> dict:
    """A list of dicts as a table item (paths linked to the image's row)."""
    cols = list(dict.fromkeys(k for x in v for k in x))
    rows = []
    for x in v[:MAX_EXAMPLES]:
        cells = []
        for c in cols:
            val = x.get(c)
            row = row_of.get(str(val)) if c == "path" else None
            if isinstance(val, list):  # e.g. a few paths: joined, like a scalar list
                text = ", ".join(fmt_value(y) if not isinstance(y, (dict, list)) else str(y) for y in val)
            else:
                text = fmt_value(val) if not isinstance(val, dict) else str(val)
            cells.append({"text": text, "row": row})
        rows.append(cells)
    return {"key": key, "kind": "table", "columns": cols, "rows": rows,
            "more": max(0, len(v) - MAX_EXAMPLES)}


def _where(f: dict) -> str:
    parts = []
    if f.get("class") is not None:
        parts.append(f"class {f['class']}")
    if f.get("cluster") is not None:
        parts.append(f"cluster {f['cluster']}")
    g = f.get("group")
    if isinstance(g, dict) and g.get("attribute") is not None:
        parts.append(f"{g['attribute']} = {g.get('value')}")
    return " · ".join(parts)


def _link(fid: str, anchor_of: dict) -> dict:
    """``{id, anchor, title}`` of a referenced finding; anchor None (and the id as title) when
    this scan has no finding with that id."""
    anchor, title = anchor_of.get(str(fid), (None, None))
    return {"id": str(fid), "anchor": anchor, "title": title or str(fid)}


def _verdict(summary: dict, findings: list, anchor_of: dict) -> dict:
    """The stored verdict (``summary["verdict"]``), or for a scan whose summary predates it the
    same function applied to the stored findings; each root cause gains its finding's anchor."""
    v = summary.get("verdict")
    if not isinstance(v, dict) or "status" not in v:
        from biasscope.summary import verdict

        v = verdict(findings)
    roots = []
    for r in v.get("root_causes") or []:
        if not isinstance(r, dict):
            continue
        sev = _finite(r.get("severity"))
        roots.append({"id": str(r.get("id")), "kind": r.get("kind"), "class": r.get("class"),
                      "severity": sev if sev is not None else 0.0,
                      "band": severity_band(sev if sev is not None else 0.0),
                      "line": str(r.get("line") or r.get("id")),
                      "anchor": anchor_of.get(str(r.get("id")), (None, None))[0]})
    n_roots = v.get("n_root_causes")
    status = str(v.get("status") or "clean")
    return {"status": status, "pill": {"shortcut": "high", "review": "medium"}.get(status, "ok"),
            "line": str(v.get("line") or ""),
            "root_causes": roots, "n_root_causes": int(n_roots) if _finite(n_roots) is not None else len(roots),
            "n_explained": int(v.get("n_explained") or 0), "min_severity": _finite(v.get("min_severity"))}


# ----------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------


def build(scan, *, thumbnails: bool = True) -> tuple[dict, dict, dict]:
    meta = scan.meta or {}
    table = scan.table.reset_index(drop=True)
    analysis = scan.analysis or {}
    findings = [dict(f) for f in (scan.findings or [])]
    n = len(table)
    ds_classes = [str(c) for c in meta.get("classes") or []]
    classes = class_order(table, ds_classes)  # dataset classes first, then other predicted outputs
    class_index = {str(k): int(v) for k, v in (meta.get("class_index") or {}).items()}
    output_name = {v: k for k, v in class_index.items()}
    name_idx = {c: i for i, c in enumerate(classes)}
    label = table["label"].astype(str).to_numpy()
    pred = table["pred"].astype(str).to_numpy()
    label_i = np.array([name_idx[c] for c in label], np.int64)
    pred_i = np.array([name_idx[c] for c in pred], np.int64)
    correct = table["correct"].to_numpy(dtype=bool)
    paths = table["path"].astype(str).to_numpy() if "path" in table.columns else np.array([f"#{i}" for i in range(n)])
    row_of: dict = {}
    for i, p in enumerate(paths):
        row_of.setdefault(p, i)
    attributes = [a for a in (analysis.get("attributes") or meta.get("attributes") or infer_attributes(table))
                  if a in table.columns]

    # --- top-5 predictions as class-name indices ------------------------------------------
    def out_name(o: int) -> int:
        nm = output_name.get(int(o), f"#{int(o)}")
        if nm not in name_idx:
            name_idx[nm] = len(classes)
            classes.append(nm)
        return name_idx[nm]

    top5, top5p = [], []
    if "top5" in table.columns:
        probs = table["top5_prob"] if "top5_prob" in table.columns else [None] * n
        for t, p in zip(table["top5"], probs):
            top5.append([out_name(o) for o in (t if t is not None else [])])
            top5p.append(_rounded(p, 4) if p is not None else [])

    # --- thumbnails -----------------------------------------------------------------------
    thumb_rows = choose_rows(table, findings, analysis) if thumbnails else np.zeros(0, np.int64)
    masks = mask_sources(table, meta, rows=thumb_rows) if len(thumb_rows) else [None] * n
    # drawn while the rest is built (by a helper process where the console script has one)
    pending = start_thumbnails(scan, thumb_rows, masks) if len(thumb_rows) else None
    cluster_maps = {}
    for cl in analysis.get("clusters") or []:
        if cl.get("mean_heatmap"):
            cluster_maps[str(cl["id"])] = heatmap_uri(np.array(cl["mean_heatmap"], np.float64))

    # --- findings ---------------------------------------------------------------------------
    anchor_of: dict = {}
    for i, f in enumerate(findings):
        f["anchor"] = f"finding-{i}"
        anchor_of.setdefault(str(f.get("id")), (f["anchor"], f.get("title")))
    summary = scan.summary or {}
    verdict = _verdict(summary, findings, anchor_of)
    root_ids = {r["id"] for r in verdict["root_causes"]}
    from biasscope.summary import explained_by

    for f in findings:
        f["band"] = severity_band(float(f["severity"]))
        f["where"] = _where(f)
        evidence = f.get("evidence") if isinstance(f.get("evidence"), dict) else {}
        # explained_by is shown as links to the explaining findings, not as an evidence cell
        f["explained_by"] = [_link(x, anchor_of) for x in explained_by(f)]
        f["evidence_items"] = _evidence_items({k: v for k, v in evidence.items() if k != "explained_by"},
                                              row_of)
        f["root_cause"] = str(f.get("id")) in root_ids
        ex = [row_of[p] for p in (f.get("examples") or []) if p in row_of]
        f["example_rows"] = ex[:MAX_EXAMPLES]
        f["n_examples"] = len(f.get("examples") or [])
    bands = [b for b, _ in BANDS]
    by_band = {b: sum(1 for f in findings if f["band"] == b) for b in bands}
    detectors = analysis.get("detectors") or {}
    skipped_detectors = [(k, v.get("reason")) for k, v in detectors.items() if v.get("status") == "skipped"]

    # --- counterfactuals -----------------------------------------------------------------
    cf = analysis.get("counterfactuals")
    cf_rows, cf_skipped, cf_sample = [], None, None
    if isinstance(cf, dict) and isinstance(cf.get("classes"), dict):
        for c, v in cf["classes"].items():
            if isinstance(v, dict):
                cf_rows.append({"name": str(c), **{k: v.get(k) for k in (
                    "n", "chance", "only_bg_rate", "only_bg_ci", "orig_acc", "mixed_rand_acc", "bg_gap",
                    "bg_gap_ci", "transplant_rate", "transplant_ci", "only_fg_acc", "only_fg_ci")}})
        if not cf_rows:
            cf_skipped = cf.get("skipped") or "no class could be tested"
        sample = (cf.get("method") or {}).get("mixed_rand_sample") or {}
        if sample.get("per_class") is not None:
            cf_sample = (f"Mixed-Rand and transplant ran on a stratified sample of at most "
                         f"{int(sample['per_class']):,} objects per class ({int(sample.get('n_objects', 0)):,} "
                         f"in all, by {', '.join(sample.get('stratified_by') or ['label'])}), "
                         "the Only-BG rates on the same sample; "
                         + (f"Only-BG images for the sample and every mistake "
                            f"({int(sample['n_only_bg']):,}), "
                            if sample.get("only_bg_rows") == "the sample and the mistakes"
                            else "Only-BG on every image, ")
                         + "Only-FG on every image.")
    else:
        cf_skipped = (cf or {}).get("skipped") if isinstance(cf, dict) else None
        cf_skipped = cf_skipped or "not run (no counterfactual results in this scan)"
    bg_gap = {r["name"]: _finite(r.get("bg_gap")) for r in cf_rows}

    # --- per class ---------------------------------------------------------------------------
    stats = analysis.get("classes") or class_stats(table, ds_classes)
    class_rows = []
    for c in class_order(table, ds_classes):
        s = stats.get(c) or {}
        if not s.get("n") and not s.get("n_pred"):
            continue
        class_rows.append({"name": c, "idx": name_idx[c], "n": s.get("n"), "n_pred": s.get("n_pred"),
                           "accuracy": s.get("accuracy"), "mean_inside_frac": s.get("mean_inside_frac"),
                           "median_inside_frac": s.get("median_inside_frac"),
                           "mean_lift": s.get("mean_lift"), "pointing_rate": s.get("pointing_rate"),
                           "n_with_mask": s.get("n_with_mask"), "bg_gap": bg_gap.get(c)})
    has_masks = bool(np.isfinite(_num(table, "inside_frac")).any())

    # --- clusters ----------------------------------------------------------------------------
    clusters = analysis.get("clusters") or []
    hans = {}
    for f in findings:
        if f["kind"] == "clever_hans_cluster" and f.get("cluster") is not None:
            hans.setdefault(int(f["cluster"]), f)
    cluster_cards = []
    for c, ids in (analysis.get("class_clusters") or {}).items():
        clustering = (stats.get(c) or {}).get("clustering") or {}
        fig_name = f"eigengap-{name_idx.get(c, 0)}"
        cards = []
        for cid in ids:
            cl = clusters[cid] if 0 <= cid < len(clusters) else None
            if cl is None:
                continue
            ex = [row_of[p] for p in (cl.get("examples") or []) if p in row_of]  # capped below
            f = hans.get(int(cid))
            cards.append({**{k: cl.get(k) for k in ("id", "size", "share_of_class", "accuracy",
                                                       "mean_inside_frac", "mean_lift", "hot_area",
                                                       "centroid_jitter")},
                          "example_rows": ex, "finding": f and {"anchor": f["anchor"], "severity": f["severity"],
                                                                 "band": f["band"]}})
        n_flagged = sum(1 for card in cards if card["finding"])
        cluster_cards.append({"name": c, "idx": name_idx.get(c), "fig": fig_name, "clusters": cards,
                              "n_flagged": n_flagged,
                              "open": bool(n_flagged) or len(analysis.get("class_clusters") or {}) <= OPEN_CLASSES,
                              "clustering": {k: clustering.get(k) for k in ("method", "k", "n_clustered",
                                                                           "n_zero_cams", "reason")},
                              "eigengap": figures.eigengap(clustering, c) if clustering else None})

    # --- groups ------------------------------------------------------------------------------
    groups = analysis.get("groups")
    if groups is None and attributes:
        groups = group_stats(table, attributes)
    gap_findings = {(f.get("class"), (f.get("group") or {}).get("attribute"), str((f.get("group") or {}).get("value"))): f
                    for f in findings if f["kind"] == "group_gap"}
    group_tables = []
    for ai, (attr, rows) in enumerate((groups or {}).items()):
        tot: dict = {}
        for g in rows:
            t = tot.setdefault(g["class"], [0, 0])
            t[0] += g["n"]
            t[1] += g["n_correct"]
        out = []
        for g in rows:
            cn, cc = tot[g["class"]]
            rest_n = cn - g["n"]
            rest_acc = (cc - g["n_correct"]) / rest_n if rest_n else None
            f = gap_findings.get((g["class"], attr, str(g["value"])))
            out.append({**g, "rest_accuracy": rest_acc,
                        "gap": None if rest_acc is None or g["accuracy"] is None else g["accuracy"] - rest_acc,
                        "finding": f and f["anchor"]})
        cut = 0
        if len(out) > MAX_GROUP_ROWS:
            cut = len(out) - MAX_GROUP_ROWS
            out = sorted(out, key=lambda g: (g["gap"] if g["gap"] is not None else 0.0))[:MAX_GROUP_ROWS]
        group_tables.append({"attribute": attr, "rows": out, "cut": cut, "fig": f"groups-{ai}",
                             "spec": figures.group_heatmap(attr, rows, class_order(table, ds_classes))})

    # --- figures -----------------------------------------------------------------------------
    figs = {}

    def add(name, s):
        if s is not None:
            figs[name] = s
            return name
        return None

    fig_kinds = add("findings-by-kind", figures.findings_by_kind(findings, bands))
    fig_class = add("per-class", figures.per_class(class_rows)) if class_rows else None
    add("explorer", figures.explorer_layout())
    for card in cluster_cards:
        card["fig"] = add(card["fig"], card.pop("eigengap"))
    n_label_classes = max(int(label_i.max()) + 1 if n else 0, len(ds_classes))
    if n:
        n_cols = max(n_label_classes, int(pred_i.max()) + 1)
        add("confusion", figures.confusion(label_i, pred_i, classes[:n_cols], n_label_classes))
    order = class_order(table, ds_classes)
    att_metric = "inside_frac" if has_masks else "cam_entropy"
    fig_att = add("attention", figures.attention_boxes(_num(table, att_metric), label, correct,
                                                       [c for c in order if (label == c).any()], metric=att_metric))
    for g in group_tables:
        g["fig"] = add(g["fig"], g.pop("spec"))
    fig_cf = add("counterfactuals", figures.counterfactuals(cf_rows))

    # --- rows for the browser ----------------------------------------------------------------
    kinds = sorted({k for fl in table.get("flags", []) if fl is not None for k in fl})
    kind_i = {k: i for i, k in enumerate(kinds)}
    cluster_col = table["cluster"] if "cluster" in table.columns else pd.Series([None] * n)
    rows = {
        "path": paths.tolist(), "label": label_i.tolist(), "pred": pred_i.tolist(),
        "correct": correct.astype(int).tolist(),
        "confidence": _rounded(_num(table, "confidence"), 4),
        "label_prob": _rounded(_num(table, "label_prob"), 4),
        **{m: _rounded(_num(table, m), 4) for m in IMAGE_METRICS},
        "cluster": [None if pd.isna(c) else int(c) for c in cluster_col],
        "x": _rounded(_num(table, "embed_x"), 3), "y": _rounded(_num(table, "embed_y"), 3),
        "flags": [[kind_i[k] for k in fl] if fl is not None else [] for fl in table.get("flags", [None] * n)],
        "top5": top5, "top5_prob": top5p,
    }
    attrs = {}
    for a in attributes:
        v = table[a]
        cats = sorted({str(x) for x in v.dropna()})
        ci = {c: i for i, c in enumerate(cats)}
        attrs[a] = {"values": cats, "codes": [-1 if pd.isna(x) else ci[str(x)] for x in v]}
    data = to_jsonable({
        "n": n, "classes": classes, "n_label_classes": n_label_classes, "kinds": kinds, "rows": rows,
        "attributes": attrs, "figures": figs, "has_masks": has_masks, "has_embedding": bool(np.isfinite(_num(table, "embed_x")).any()),
        "clusters": [{"id": cl["id"], "class": cl["class"]} for cl in clusters],
        "thumb_capped": bool(n > FULL_BELOW),
    })

    # --- the thumbnails, finished ------------------------------------------------------------
    images = pending.result() if pending is not None else {}
    thumb_state = np.full(n, -1, np.int64)        # -1: capped out
    thumb_state[thumb_rows] = -2                  # -2: chosen but the image could not be read
    thumb_state[list(images)] = 1
    data["rows"]["thumb"] = thumb_state.tolist()
    thumbs = {"images": {str(r): u for r, u in images.items()}, "clusters": cluster_maps}
    for group in cluster_cards:
        for card in group["clusters"]:
            ex = card["example_rows"]
            card["example_rows"] = ([r for r in ex if r in images] or ex)[:CLUSTER_EXAMPLES]  # those with thumbnails

    # --- headline and metadata ---------------------------------------------------------------
    model = meta.get("model") or {}
    n_images = meta.get("n_images", n)
    worst = summary.get("worst_group") or {}
    worst_text = ""
    if worst:
        worst_text = f"{worst.get('class')}" + (f", {worst.get('attribute')} = {worst.get('value')}"
                                                 if worst.get("attribute") else "") + f" (n = {worst.get('n')})"
    headline = {
        "model": model.get("name") or "–", "model_path": model.get("path"),
        "data": meta.get("data_root") or "–", "n": n, "n_images": n_images,
        "n_skipped": len(meta.get("skipped") or []),
        "accuracy": summary.get("accuracy", float(correct.mean()) if n else None),
        "worst_group_acc": summary.get("worst_group_acc"), "worst_group": worst_text,
        "mean_inside_frac": summary.get("mean_inside_frac"),
        "n_with_mask": summary.get("n_with_mask", int(np.isfinite(_num(table, "inside_frac")).sum())),
        "heatmaps_all_zero": bool(summary.get("heatmaps_all_zero")),
        "layer": meta.get("layer"), "layer_output": meta.get("layer_output"), "method": meta.get("method"), "n_classes": len(ds_classes) or len(order),
        "by_band": by_band, "n_findings": len(findings),
        "gates": summary.get("gates") or [],
        "verdict": verdict,
    }
    page = {
        "title": f"biasscope report: {headline['model']} on {Path(str(headline['data'])).name or headline['data']}",
        "headline": headline, "findings": findings, "skipped_detectors": skipped_detectors,
        "class_rows": class_rows, "has_masks": has_masks, "cluster_cards": cluster_cards,
        "group_tables": group_tables, "attributes": attributes, "cf_rows": cf_rows, "cf_skipped": cf_skipped,
        "cf_sample": cf_sample,
        "fig_kinds": fig_kinds, "fig_class": fig_class, "fig_att": fig_att, "fig_cf": fig_cf,
        "att_metric": att_metric, "projection": (analysis.get("projection") or {}).get("method"),
        "meta": _run_metadata(meta, analysis, n, len(images), len(thumb_rows)),
        "n_thumbs": len(images), "thumb_capped": n > FULL_BELOW, "bands": bands,
        "open_findings": OPEN_FINDINGS,
    }
    return page, data, thumbs


def _seconds(v) -> str:
    f = _finite(v)
    return "–" if f is None else (f"{f:.2f} s" if f < 100 else f"{f / 60:.1f} min")


def _timing(key: str, v) -> tuple[str, str]:
    if key.endswith("_per_s"):
        f = _finite(v)
        return key[:-6].replace("_", " ") + " per second", "–" if f is None else f"{f:,.1f}"
    if key.endswith("_s"):
        return key[:-2].replace("_", " "), _seconds(v)
    return key.replace("_", " "), fmt_value(v)


def _thumb_note(n: int, n_thumbs: int, n_chosen: int) -> str:
    text = f"{n_thumbs:,} of {n:,} images"
    notes = []
    if n_chosen < n:
        notes.append(f"capped above {FULL_BELOW:,} images: finding examples, cluster samples and flagged images")
    if n_chosen > n_thumbs:
        notes.append(f"{n_chosen - n_thumbs:,} not readable")
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _run_metadata(meta: dict, analysis: dict, n: int, n_thumbs: int, n_chosen: int) -> dict:
    model = meta.get("model") or {}
    options = []
    for k, v in (meta.get("options") or {}).items():
        if isinstance(v, dict) and len(v) > 12:
            v = f"{len(v)} entries"
        elif isinstance(v, (dict, list)):
            v = ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else " × ".join(map(str, v)) \
                if k == "image_size" else ", ".join(map(str, v))
        options.append((k, fmt_value(v)))
    cmd = meta.get("command")
    if isinstance(cmd, (list, tuple)):
        cmd = " ".join(map(str, cmd))
    timings = [_timing(k, v) for k, v in (meta.get("timings") or {}).items()]
    timings += [_timing(k, v) for k, v in (analysis.get("timings") or {}).items()]
    warnings = []
    for k, v in (meta.get("warnings") or {}).items():
        if isinstance(v, dict):
            ex = v.get("examples") or []
            warnings.append((k, fmt_value(v.get("count")), ", ".join(map(str, ex[:10]))))
        else:
            warnings.append((k, fmt_value(v), ""))
    detectors = [(k, v.get("status"), v.get("reason") or "", fmt_value(v.get("n_findings")),
                  fmt_value(v.get("n_flagged"))) for k, v in (analysis.get("detectors") or {}).items()]
    skipped = meta.get("skipped") or []
    return {
        "command": cmd,
        # (key, value, monospace)
        "model": [("name", model.get("name"), False), ("path", model.get("path"), True),
                  ("sha256", model.get("sha256"), True), ("output head", model.get("head"), False),
                  ("outputs", fmt_value(model.get("n_outputs")), False),
                  ("target layer", meta.get("layer"), True),
                  ("layer output", " × ".join(map(str, meta.get("layer_shape") or [])) or None, False),
                  ("method", meta.get("method"), False)],
        "data": [("data root", meta.get("data_root"), True),
                 ("images listed", fmt_value(meta.get("n_images")), False),
                 ("images scanned", fmt_value(n), False), ("skipped (unreadable)", fmt_value(len(skipped)), False),
                 ("classes", fmt_value(len(meta.get("classes") or [])), False),
                 ("attributes", ", ".join(meta.get("attributes") or []) or "none", False),
                 ("2-D map", (analysis.get("projection") or {}).get("method"), False),
                 ("thumbnails", _thumb_note(n, n_thumbs, n_chosen), False)],
        "options": options, "versions": list((meta.get("versions") or {}).items()),
        "timings": timings, "warnings": warnings, "detectors": detectors,
        "skipped": [(s.get("path"), s.get("reason")) for s in skipped[:200]],
        "skipped_more": max(0, len(skipped) - 200),
        "fingerprint": meta.get("fingerprint"), "schema_version": meta.get("schema_version"),
    }
