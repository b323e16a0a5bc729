"""The interactive HTML report of a stored scan (DESIGN section 7).

``write_report(scan_or_dir, path=None)`` renders one self-contained HTML file that works offline
from ``file://``: Plotly.js embedded once, the figures as JSON specs drawn with
``Plotly.newPlot``, thumbnails as JPEG data URIs stored once per image. It reads only the
stored scan (:func:`biasscope.store.load`) and the image/mask files for the thumbnails; no
TensorFlow anywhere in this package.

Layout of the package::

    build.py        scan -> template context, browser data, thumbnails
    figures.py      the Plotly figure specs
    thumbnails.py   image / CAM overlay / mask outline JPEGs, and which images get them
                    (2/3 of them drawn by the console script's helper, biasscope.helper)
    escape.py       script-safe JSON, Plotly-safe text
    templates/      report.html.j2 (Jinja2, autoescape on), report.css, report.js
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
from markupsafe import Markup

from biasscope.errors import BiasscopeError

__all__ = ["write_report", "render_html"]


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("biasscope.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, num=_num, intc=_intc, signed_pct=_signed_pct, ci=_ci)
    return env


def _asset(name: str) -> str:
    return resources.files("biasscope.report").joinpath("templates", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    from .escape import script_js

    return script_js(get_plotlyjs())


def _plotly_template() -> dict:
    import plotly.io as pio

    from biasscope.analysis import to_jsonable

    return to_jsonable(pio.templates["plotly_white"].to_plotly_json())


# -- Jinja filters (None -> an en dash) --------------------------------------------------------

def _ok(v) -> bool:
    try:
        return v is not None and float(v) == float(v) and abs(float(v)) != float("inf")
    except (TypeError, ValueError):
        return False


def _pct(v, nd: int = 1) -> str:
    return f"{100 * float(v):.{nd}f}%" if _ok(v) else "–"


def _signed_pct(v) -> str:
    return f"{round(100 * float(v), 1) + 0.0:+.1f} pts" if _ok(v) else "–"  # + 0.0: no "-0.0"


def _num(v, nd: int = 3) -> str:
    return f"{float(v):.{nd}f}" if _ok(v) else "–"


def _intc(v) -> str:
    return f"{int(v):,}" if _ok(v) else "–"


def _ci(v, nd: int | None = None) -> str:
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_ok(x) for x in v):
        return ""
    if nd is None:
        return f"[{_pct(v[0])}, {_pct(v[1])}]"
    return f"[{float(v[0]):.{nd}f}, {float(v[1]):.{nd}f}]"


# -- rendering ------------------------------------------------------------------------------------

def render_html(scan, *, thumbnails: bool = True) -> str:
    """The report of a loaded :class:`~biasscope.store.Scan` as an HTML string."""
    from biasscope import __version__

    from .build import build
    from .escape import script_json

    page, data, thumbs = build(scan, thumbnails=thumbnails)
    data["template"] = _plotly_template()
    template = _environment().get_template("report.html.j2")
    return template.render(
        **page, version=__version__,
        css=Markup(_css()),
        report_js=Markup(_script(_asset("report.js"))),
        plotly_js=Markup(_plotly_js()),
        # script_json escapes < > & U+2028 U+2029: nothing in it can end the <script> element
        data_json=Markup(script_json(data)), thumbs_json=Markup(script_json(thumbs)),
    )


def _css() -> str:
    css = _asset("report.css")
    if "</" in css:  # would end the <style> element; the stylesheet is ours and has none
        raise AssertionError("report.css must not contain '</'")
    return css


def _script(code: str) -> str:
    from .escape import script_js

    return script_js(code)


def write_report(scan_or_dir, path=None) -> Path:
    """Render the report of a scan and write it; returns the path written.

    Parameters
    ----------
    scan_or_dir : Scan or path
        A loaded :class:`~biasscope.store.Scan` or a finished scan directory.
    path : path, optional
        The HTML file to write (default ``SCAN_DIR/report.html``); its folder is created.

    Raises
    ------
    BiasscopeError
        If the directory is not a finished scan or the file cannot be written.
    """
    from biasscope.store import Scan, load, write_file

    scan = scan_or_dir if isinstance(scan_or_dir, Scan) else load(scan_or_dir)
    out = Path(path) if path is not None else Path(scan.path) / "report.html"
    if out.is_dir():
        raise BiasscopeError(f"--out {out}: is a directory; give a file name such as {out / 'report.html'}")
    return write_file(out, render_html(scan), what="the report")
