"""Escaping for the three places user strings (paths, class names, attribute values) end up.

* HTML text and attributes: Jinja2 with autoescape on (the template environment).
* JSON inside ``<script type="application/json">``: :func:`script_json`. The HTML parser ends a
  script element at ``</script`` and treats ``<!--`` specially, whatever the JSON means; and
  U+2028/U+2029 end a line in older JavaScript. Escaping every ``<``, ``>``, ``&`` and the two
  separators as ``\\uXXXX`` leaves the same JSON value and nothing the HTML parser acts on.
* Plotly text (tick labels, legend names, hover text, titles): Plotly reads these as a small
  subset of HTML (``<b>``, ``<a href>``, ``<br>``...). :func:`plotly_text` turns ``&``, ``<``,
  ``>`` into entities, which Plotly shows as the literal characters.

The report's JavaScript inserts strings with ``textContent`` only, never ``innerHTML``.
"""

from __future__ import annotations

import html
import json
import re

__all__ = ["plotly_text", "script_json", "script_js"]

_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
                  "\u2029": "\\u2029"}
_SCRIPT_RE = re.compile("[<>&\u2028\u2029]")


def script_json(obj) -> str:
    """``obj`` as JSON that is safe verbatim inside a ``<script>`` element.

    NaN and infinities are not JSON: pass values through ``to_jsonable`` first (a NaN here
    raises ValueError rather than producing a report the browser cannot parse).
    """
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _SCRIPT_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group(0)], text)


def script_js(code: str) -> str:
    """Trusted JavaScript (Plotly.js, the report's own) made safe to inline: a ``</script``
    inside it would end the element early. ``<\\/`` means the same in JS strings and regexes."""
    return re.sub(r"</(?=script)", r"<\\/", code, flags=re.IGNORECASE).replace("<!--", "<\\!--")


def plotly_text(s) -> str:
    """A user string as Plotly text that displays literally (entities for ``& < >``)."""
    return html.escape(str(s), quote=False)
