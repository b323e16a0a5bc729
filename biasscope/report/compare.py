"""``compare.html``: one self-contained offline page for a comparison of two scans.

The report's stack: Jinja2 with autoescape on for every user string in the HTML, Plotly.js
embedded once, the figure specs as script-safe JSON drawn by a few lines of JavaScript that
insert text with ``textContent`` only. It reads only the comparison's result dict.
"""

from __future__ import annotations

import os
from pathlib import Path

from markupsafe import Markup

from biasscope.errors import BiasscopeError

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
  // the flip lists: the selected list's paths, inserted as text only
  var pick = document.getElementById("flip-class");
  var list = document.getElementById("flip-list");
  function show() {
    var key = pick.value.split("/");
    var paths = (data.flips[key[0]] || {})[key[1]] || [];
    while (list.firstChild) { list.removeChild(list.firstChild); }
    paths.forEach(function (p) {
      var li = document.createElement("li");
      li.textContent = p;
      list.appendChild(li);
    });
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


def _flip_lists(result: dict) -> tuple[dict, list]:
    flips = result["flips"]
    lists = {"all": {d: flips[d]["paths"] for d in ("right_to_wrong", "wrong_to_right")}}
    options = [("all", "right_to_wrong", f"all classes: right to wrong ({flips['right_to_wrong']['count']})"),
               ("all", "wrong_to_right", f"all classes: wrong to right ({flips['wrong_to_right']['count']})")]
    for i, (cls, f) in enumerate(flips["per_class"].items()):
        key = f"c{i}"  # class names are user strings: keyed by position, shown as text
        lists[key] = {d: f[d]["paths"] for d in ("right_to_wrong", "wrong_to_right")}
        for d, words in (("right_to_wrong", "right to wrong"), ("wrong_to_right", "wrong to right")):
            if f[d]["count"]:
                options.append((key, d, f"{cls}: {words} ({f[d]['count']})"))
    return lists, [{"value": f"{k}/{d}", "label": label} for k, d, label in options]


def render_compare_html(result: dict) -> str:
    """The page of a comparison result (the ``compare.json`` dict) as an HTML string."""
    from biasscope import __version__

    from . import _css

    lists, options = _flip_lists(result)
    data = {"figures": {"delta-chart": _delta_figure(result)}, "flips": lists,
            "template": _plotly_template()}
    template = _environment().get_template("compare.html.j2")
    return template.render(r=result, version=__version__, flip_options=options,
                           css=Markup(_css()), compare_js=Markup(_script(_JS)),
                           plotly_js=Markup(_plotly_js()), data_json=Markup(script_json(data)))


def write_compare_html(result: dict, path) -> Path:
    out = Path(path)
    text = render_compare_html(result)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        raise BiasscopeError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
