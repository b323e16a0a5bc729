"""``compare.html``: one self-contained offline page for a comparison of two scans.

The report's stack: Jinja2 with autoescape on for every user string in the HTML, Plotly.js
embedded once, the figure specs as script-safe JSON drawn by a few lines of JavaScript that
insert text with ``textContent`` only. It reads only the comparison's result dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from markupsafe import Markup


from . import _environment, _plotly_js, _plotly_template, _script
from .escape import plotly_text, script_json

__all__ = ["render_compare_html", "write_compare_html"]

_JS = """
(function () {
  var data = JSON.parse(document.getElementById("compare-data").textContent);
  var figs = data.figures;
  Object.keys(figs).forEach(function (id) {
    var div = document.getElementById(id);
    if (!div) { return; }
    var fig = figs[id];
    fig.layout.template = data.template;
    Plotly.newPlot(div, fig.data, fig.layout, {displaylogo: false, responsive: true});
  });
  // the flip lists: the selected list's paths, inserted as text only; a click shows the
  // image's baseline and candidate CAMs side by side
  var pick = document.getElementById("flip-class");
  var list = document.getElementById("flip-list");
  var view = document.getElementById("flip-view");
  function cell(uri, caption) {
    var fig = document.createElement("figure");
    if (uri && uri.indexOf("data:image/") === 0) {
      var img = document.createElement("img");
      img.src = uri;
      img.alt = caption;
      fig.appendChild(img);
    }
    var cap = document.createElement("figcaption");
    cap.textContent = caption;
    fig.appendChild(cap);
    return fig;
  }
  function open(i) {
    var im = data.images[i];
    while (view.firstChild) { view.removeChild(view.firstChild); }
    var title = document.createElement("p");
    title.className = "path";
    title.textContent = im.path + " (label " + im.label + ")";
    view.appendChild(title);
    view.appendChild(cell(im.baseline, "baseline: predicted " + im.baseline_pred));
    view.appendChild(cell(im.candidate, "candidate: predicted " + im.candidate_pred));
  }
  function show() {
    var key = pick.value.split("/");
    var rows = (data.flips[key[0]] || {})[key[1]] || [];
    while (list.firstChild) { list.removeChild(list.firstChild); }
    rows.forEach(function (i) {
      var li = document.createElement("li");
      var a = document.createElement("button");
      a.type = "button";
      a.className = "flip";
      a.textContent = data.images[i].path;
      a.addEventListener("click", function () { open(i); });
      li.appendChild(a);
      list.appendChild(li);
    });
    if (rows.length) { open(rows[0]); }
  }
  if (pick && list) { pick.addEventListener("change", show); show(); }
})();
"""


def _delta_figure(result: dict) -> dict:
    """Per class (and all images): the accuracy delta and, where both scans have masks, the
    inside_frac delta, each with its 95% CI."""
    rows = [*result["per_class"].items(), ("all images", result["overall"])]
    names = [plotly_text(c) for c, _ in rows]
    traces = []
    for key, label, ci_key in (("delta_accuracy", "accuracy", "delta_accuracy_ci"),
                               ("inside_frac", "mean inside_frac", None)):
        ys, lo, hi = [], [], []
        for _, r in rows:
            if ci_key is None:
                entry = r.get(key)
                y, ci = (None, None) if entry is None else (entry["delta"], entry["ci"])
            else:
                y, ci = r.get(key), r.get(ci_key)
            ys.append(y)
            lo.append(None if y is None or ci is None else y - ci[0])
            hi.append(None if y is None or ci is None else ci[1] - y)
        if all(y is None for y in ys):
            continue
        traces.append({"type": "scatter", "mode": "markers", "name": label, "x": names, "y": ys,
                       "error_y": {"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                       "marker": {"size": 10}})
    return {"data": traces,
            "layout": {"height": 360, "margin": {"l": 60, "r": 20, "t": 30, "b": 80},
                       "yaxis": {"title": {"text": "candidate - baseline (95% CI)"}, "zeroline": True},
                       "xaxis": {"type": "category"}, "legend": {"orientation": "h"}}}


def _flip_images(result: dict, baseline, candidate) -> tuple[list, dict]:
    """Every listed flipped image once, with both CAMs: overlays on the image when its file can
    be read (from the baseline's data folder), else the CAMs alone. Returns (images, index of
    each path)."""
    from .thumbnails import heatmap_uri, mask_sources, render_one

    flips = result["flips"]
    paths = list(dict.fromkeys(flips["right_to_wrong"]["paths"] + flips["wrong_to_right"]["paths"]))
    images: list = []
    if baseline is None or candidate is None:
        return [{"path": p, "label": "", "baseline_pred": "", "candidate_pred": "", "baseline": None,
                 "candidate": None} for p in paths], {p: i for i, p in enumerate(paths)}
    tb, tc = baseline.table, candidate.table
    rb = dict(zip(tb["path"].astype(str)[::-1], range(len(tb))[::-1]))  # the first row of a path
    rc = dict(zip(tc["path"].astype(str)[::-1], range(len(tc))[::-1]))
    masks = mask_sources(tb, baseline.meta) if paths else []
    root = Path(str(baseline.meta.get("data_root") or "."))
    for p in paths:
        i, j = rb[p], rc[p]
        cam_b = np.asarray(baseline.heatmaps[i], np.float32)
        cam_c = np.asarray(candidate.heatmaps[j], np.float32)
        ub = render_one(str(root / p), cam_b, None, masks[i])
        uc = render_one(str(root / p), cam_c, None, masks[i])
        images.append({"path": p, "label": str(tb["label"].iloc[i]),
                       "baseline_pred": str(tb["pred"].iloc[i]), "candidate_pred": str(tc["pred"].iloc[j]),
                       "baseline": ub[1] if ub else heatmap_uri(cam_b),
                       "candidate": uc[1] if uc else heatmap_uri(cam_c)})
    return images, {p: k for k, p in enumerate(paths)}


def _flip_lists(result: dict, index: dict) -> tuple[dict, list]:
    flips = result["flips"]

    def rows(ps):
        return [index[p] for p in ps if p in index]

    lists = {"all": {d: rows(flips[d]["paths"]) for d in ("right_to_wrong", "wrong_to_right")}}
    options = [("all", "right_to_wrong", f"all classes: right to wrong ({flips['right_to_wrong']['count']})"),
               ("all", "wrong_to_right", f"all classes: wrong to right ({flips['wrong_to_right']['count']})")]
    for i, (cls, f) in enumerate(flips["per_class"].items()):
        key = f"c{i}"  # class names are user strings: keyed by position, shown as text
        lists[key] = {d: rows(f[d]["paths"]) for d in ("right_to_wrong", "wrong_to_right")}
        for d, words in (("right_to_wrong", "right to wrong"), ("wrong_to_right", "wrong to right")):
            if f[d]["count"]:
                options.append((key, d, f"{cls}: {words} ({f[d]['count']})"))
    return lists, [{"value": f"{k}/{d}", "label": label} for k, d, label in options]


def render_compare_html(result: dict, baseline=None, candidate=None) -> str:
    """The page of a comparison result (the ``compare.json`` dict) as an HTML string; with the
    two :class:`~biasscope.store.Scan` objects, the flipped images carry both CAMs."""
    from biasscope import __version__

    from . import _css

    images, index = _flip_images(result, baseline, candidate)
    lists, options = _flip_lists(result, index)
    data = {"figures": {"delta-chart": _delta_figure(result)}, "flips": lists, "images": images,
            "template": _plotly_template()}
    template = _environment().get_template("compare.html.j2")
    return template.render(r=result, version=__version__, flip_options=options,
                           css=Markup(_css()), compare_js=Markup(_script(_JS)),
                           plotly_js=Markup(_plotly_js()), data_json=Markup(script_json(data)))


def write_compare_html(result: dict, path, baseline=None, candidate=None) -> Path:
    from biasscope.store import write_file

    return write_file(path, render_compare_html(result, baseline, candidate))
