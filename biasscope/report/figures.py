"""The report's Plotly figures as JSON specs (``{"data": [...], "layout": {...}}``).

Built with ``plotly.graph_objects`` (validated) and serialised without the template (one shared
template is embedded once and applied in the browser). Every user string in a figure passes
through :func:`~biasscope.report.escape.plotly_text`; categorical axes are forced to
``type="category"`` so that class names like ``"1"`` are not read as numbers.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from biasscope.analysis import to_jsonable

from .escape import plotly_text as pt

COLORS = {
    "accuracy": "#4c78a8", "inside_frac": "#f58518", "pointing": "#54a24b", "bg_gap": "#b279a2",
    "lift": "#e45756", "correct": "#2a9d8f", "wrong": "#e76f51", "chance": "#444444",
    "high": "#d64545", "medium": "#f0a030", "low": "#8aa1b1",
}
MARGIN = dict(l=50, r=20, t=40, b=40)


def spec(fig: go.Figure) -> dict:
    """A figure as a JSON-ready dict without its template (the report embeds one, once)."""
    d = fig.to_plotly_json()
    d["layout"].pop("template", None)
    return to_jsonable({"data": d["data"], "layout": d["layout"]})


def _layout(fig, *, height, title=None, **kw):
    fig.update_layout(height=height, margin=kw.pop("margin", MARGIN),
                      title=dict(text=title, x=0, xanchor="left", font=dict(size=14)) if title else None,
                      **kw)
    return fig


def findings_by_kind(findings, bands) -> dict | None:
    """Horizontal stacked bars: number of findings per kind, split by severity band."""
    if not findings:
        return None
    kinds = sorted({f["kind"] for f in findings}, key=lambda k: -max(f["severity"] for f in findings if f["kind"] == k))
    fig = go.Figure()
    for band in bands:
        counts = [sum(1 for f in findings if f["kind"] == k and f["band"] == band) for k in kinds]
        fig.add_trace(go.Bar(y=[pt(k) for k in kinds], x=counts, orientation="h", name=band,
                             marker_color=COLORS[band], hovertemplate="%{y}: %{x} " + band + "<extra></extra>"))
    _layout(fig, height=60 + 28 * len(kinds), barmode="stack", title="findings by kind and severity",
            margin=dict(l=150, r=20, t=40, b=30),
            yaxis=dict(type="category", autorange="reversed"), xaxis=dict(title=None, dtick=None),
            legend=dict(orientation="h", y=1.12, x=1, xanchor="right", traceorder="normal"))
    return spec(fig)


def per_class(rows) -> dict:
    """Accuracy, mean inside_frac, pointing rate (and BG-gap) per class as grouped bars; mean
    lift as diamonds on a second axis with the chance line lift = 1."""
    names = [pt(r["name"]) for r in rows]
    fig = go.Figure()
    series = [("accuracy", "accuracy", COLORS["accuracy"]),
              ("mean_inside_frac", "mean inside_frac", COLORS["inside_frac"]),
              ("pointing_rate", "pointing game", COLORS["pointing"])]
    if any(r.get("bg_gap") is not None for r in rows):
        series.append(("bg_gap", "BG-gap", COLORS["bg_gap"]))
    for key, label, color in series:
        vals = [r.get(key) for r in rows]
        if all(v is None for v in vals):
            continue
        fig.add_trace(go.Bar(x=names, y=vals, name=label, marker_color=color,
                             hovertemplate="%{x}<br>" + label + " %{y:.3f}<extra></extra>"))
    lifts = [r.get("mean_lift") for r in rows]
    if any(v is not None for v in lifts):
        fig.add_trace(go.Scatter(x=names, y=lifts, name="mean lift (right axis)", yaxis="y2",
                                 mode="markers", marker=dict(symbol="diamond", size=11, color=COLORS["lift"],
                                                             line=dict(width=1, color="white")),
                                 hovertemplate="%{x}<br>mean lift %{y:.2f}<extra></extra>"))
        top = max(2.0, 1.1 * max(v for v in lifts if v is not None))
        fig.add_shape(type="line", xref="paper", x0=0, x1=1, yref="y2", y0=1, y1=1,
                      line=dict(color=COLORS["lift"], width=1, dash="dot"))
        fig.add_annotation(xref="paper", x=1, xanchor="right", yref="y2", y=1, yanchor="bottom",
                           text="lift = 1 (chance)", showarrow=False, font=dict(size=10, color=COLORS["lift"]))
        fig.update_layout(yaxis2=dict(title="lift (1 = chance)", overlaying="y", side="right",
                                      range=[0, top], showgrid=False, zeroline=False, tickmode="auto",
                                      nticks=6, tickformat=".1f"))
    _layout(fig, height=340, barmode="group", title="per class",
            margin=dict(l=50, r=60, t=40, b=60),
            xaxis=dict(type="category", automargin=True),
            yaxis=dict(range=[0, 1.05], title="rate", tickformat=".0%"),
            legend=dict(orientation="h", y=-0.22 if len(rows) < 12 else -0.35, x=0))
    return spec(fig)


def eigengap(clustering: dict, class_name: str) -> dict | None:
    """A class's Laplacian spectrum (points) and the gaps between consecutive eigenvalues
    (bars, the chosen one highlighted): the eigengap heuristic behind its number of clusters."""
    vals = clustering.get("eigenvalues") or []
    gaps = clustering.get("eigengaps") or []
    if len(vals) < 2:
        return None
    k = clustering.get("k_eigengap") or clustering.get("k") or 1
    xs = list(range(1, len(vals) + 1))
    fig = go.Figure()
    colors = ["#d64545" if i + 1 == k else "#c9d3dc" for i in range(len(gaps))]
    fig.add_trace(go.Bar(x=[i + 1.5 for i in range(len(gaps))], y=gaps, name="gap", marker_color=colors,
                         width=0.6, hovertemplate="gap λ%{customdata}<br>%{y:.3f}<extra></extra>",
                         customdata=[f"{i + 1}→λ{i + 2}" for i in range(len(gaps))]))
    fig.add_trace(go.Scatter(x=xs, y=vals, mode="lines+markers", name="eigenvalue",
                             line=dict(color="#4c78a8"), marker=dict(size=6),
                             hovertemplate="λ%{x} = %{y:.3f}<extra></extra>"))
    # a fixed size: the figure may be drawn while its (collapsed) card is hidden
    _layout(fig, height=200, width=250, showlegend=False, margin=dict(l=40, r=10, t=30, b=30),
            title=f"eigengap: k = {int(clustering.get('k') or 0)}",
            xaxis=dict(dtick=1, title=None), yaxis=dict(title=None, rangemode="tozero"))
    return spec(fig)


def confusion(label_idx, pred_idx, classes, n_rows: int) -> dict:
    """Confusion matrix: rows = true class (the dataset's), columns = predicted output. Colour
    is the share of the row (so errors show next to large diagonals), text the count. Axes are
    class indices with the names as tick text, so a click gives indices, not names."""
    n_cols = len(classes)
    counts = np.zeros((n_rows, n_cols), np.int64)
    np.add.at(counts, (np.asarray(label_idx), np.asarray(pred_idx)), 1)
    share = counts / np.maximum(1, counts.sum(axis=1, keepdims=True))
    names = [pt(c) for c in classes]
    show_text = n_cols <= 25
    kw = {}
    if n_cols <= 60:
        kw["customdata"] = [[[names[r], names[c]] for c in range(n_cols)] for r in range(n_rows)]
        kw["hovertemplate"] = ("true %{customdata[0]}<br>predicted %{customdata[1]}<br>"
                               "%{text} image(s), %{z:.0%} of the row<extra></extra>")
    fig = go.Figure(go.Heatmap(
        z=share, x=list(range(n_cols)), y=list(range(n_rows)), text=counts.astype(str),
        texttemplate="%{text}" if show_text else None, colorscale="Blues", zmin=0, zmax=1,
        colorbar=dict(title=dict(text="share of row", side="right"), tickformat=".0%", thickness=12), xgap=1, ygap=1,
        **kw))
    cell = max(10, min(64, 640 // max(n_rows, n_cols, 1)))
    _layout(fig, height=cell * n_rows + 150, width=cell * n_cols + 250, title="confusion matrix (click a cell)",
            margin=dict(l=110, r=20, t=40, b=110),
            xaxis=dict(title="predicted", tickvals=list(range(n_cols)), ticktext=names, tickangle=-40,
                       showgrid=False, automargin=True, constrain="domain"),
            yaxis=dict(title="true", tickvals=list(range(n_rows)), ticktext=names[:n_rows],
                       autorange="reversed", showgrid=False, automargin=True,
                       scaleanchor="x", constrain="domain"))
    return spec(fig)


def _box_stats(v: np.ndarray):
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    iqr = q3 - q1
    lo = v[v >= q1 - 1.5 * iqr].min()
    hi = v[v <= q3 + 1.5 * iqr].max()
    return dict(q1=q1, median=med, q3=q3, lowerfence=lo, upperfence=hi, mean=v.mean(), n=len(v))


def attention_boxes(values, label_names, correct, classes, *, metric: str) -> dict | None:
    """Box plots of a per-image attention metric by true class, correct vs wrong predictions.
    Quartiles are computed here (a few numbers per box, not every image)."""
    values = np.asarray(values, np.float64)
    if not np.isfinite(values).any():
        return None
    fig = go.Figure()
    for ok, name, color in ((True, "correct", COLORS["correct"]), (False, "wrong", COLORS["wrong"])):
        xs, stats = [], []
        for c in classes:
            s = _box_stats(values[(label_names == c) & (correct == ok)])
            if s is not None:
                xs.append(pt(c))
                stats.append(s)
        if not xs:
            continue
        fig.add_trace(go.Box(
            x=xs, name=name, marker_color=color, boxmean=True,
            **{k: [s[k] for s in stats] for k in ("q1", "median", "q3", "lowerfence", "upperfence", "mean")}))
    rng = [0, 1] if metric in ("inside_frac", "cam_entropy") else None
    _layout(fig, height=340, boxmode="group", title=f"{metric} by true class: correct vs wrong predictions",
            xaxis=dict(type="category", automargin=True),
            yaxis=dict(title=metric, range=rng),
            legend=dict(orientation="h", y=1.12, x=1, xanchor="right"))
    return spec(fig)


def group_heatmap(attribute: str, groups, classes) -> dict | None:
    """Accuracy per (class, attribute value) as a heatmap with the group size in each cell."""
    values = sorted({g["value"] for g in groups})
    cls = [c for c in classes if any(g["class"] == c for g in groups)]
    if not values or not cls or len(values) > 40:
        return None
    z = np.full((len(cls), len(values)), np.nan)
    text = [["" for _ in values] for _ in cls]
    ci, vi = {c: i for i, c in enumerate(cls)}, {v: i for i, v in enumerate(values)}
    for g in groups:
        if g["class"] in ci:
            i, j = ci[g["class"]], vi[g["value"]]
            z[i, j] = g["accuracy"] if g["accuracy"] is not None else np.nan
            text[i][j] = f"{g['accuracy']:.0%}<br>n={g['n']}" if g["accuracy"] is not None else f"n={g['n']}"
    fig = go.Figure(go.Heatmap(
        z=z, x=[pt(v) for v in values], y=[pt(c) for c in cls], text=text,
        texttemplate="%{text}" if len(values) * len(cls) <= 300 else None,
        colorscale="RdYlGn", zmin=0, zmax=1, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="accuracy", side="right"), tickformat=".0%", thickness=12),
        hovertemplate="%{y} / %{x}<br>accuracy %{z:.1%}<extra></extra>"))
    _layout(fig, height=max(240, 90 + 36 * len(cls)), width=min(1100, 230 + 80 * len(values)),
            title=f"accuracy by class and {pt(attribute)}",
            margin=dict(l=100, r=20, t=40, b=60),
            xaxis=dict(type="category", automargin=True, showgrid=False),
            yaxis=dict(type="category", autorange="reversed", automargin=True, showgrid=False))
    return spec(fig)


def _ci_err(value, ci):
    if value is None or not isinstance(ci, (list, tuple)) or len(ci) != 2 or None in ci:
        return None, None
    return max(0.0, ci[1] - value), max(0.0, value - ci[0])


def counterfactuals(rows) -> dict | None:
    """Only-BG prediction rate (vs chance), BG-gap and background transplant rate per class,
    with their bootstrap confidence intervals."""
    if not rows:
        return None
    names = [pt(r["name"]) for r in rows]
    fig = go.Figure()
    for key, ci_key, label, color in (("only_bg_rate", "only_bg_ci", "Only-BG rate", "#f58518"),
                                      ("bg_gap", "bg_gap_ci", "BG-gap", COLORS["bg_gap"]),
                                      ("transplant_rate", "transplant_ci", "transplant rate", "#4c78a8")):
        vals = [r.get(key) for r in rows]
        if all(v is None for v in vals):
            continue
        errs = [_ci_err(r.get(key), r.get(ci_key)) for r in rows]
        fig.add_trace(go.Bar(x=names, y=vals, name=label, marker_color=color,
                             error_y=dict(type="data", array=[e[0] for e in errs],
                                          arrayminus=[e[1] for e in errs], visible=True, thickness=1.2),
                             hovertemplate="%{x}<br>" + label + " %{y:.3f}<extra></extra>"))
    chance = [r.get("chance") for r in rows]
    if any(c is not None for c in chance):
        fig.add_trace(go.Scatter(x=names, y=chance, name="chance", mode="markers",
                                 marker=dict(symbol="line-ew-open", size=28, color=COLORS["chance"],
                                             line=dict(width=2)),
                                 hovertemplate="%{x}<br>chance %{y:.3f}<extra></extra>"))
    _layout(fig, height=320, barmode="group", title="background tests (95% bootstrap CIs)",
            xaxis=dict(type="category", automargin=True), yaxis=dict(title="rate"),
            legend=dict(orientation="h", y=1.14, x=1, xanchor="right"))
    return spec(fig)


def explorer_layout() -> dict:
    """Layout of the attention explorer; its traces are built in the browser from the rows,
    so that recolouring does not need one copy of the points per colouring."""
    fig = go.Figure()
    _layout(fig, height=560, margin=dict(l=20, r=20, t=10, b=20), hovermode="closest",
            xaxis=dict(showticklabels=False, zeroline=False, showgrid=False, title=None),
            yaxis=dict(showticklabels=False, zeroline=False, showgrid=False, title=None),
            legend=dict(itemsizing="constant"), dragmode="zoom")
    return spec(fig)
