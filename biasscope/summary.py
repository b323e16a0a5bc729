"""Headline figures of a scan (``summary.json``) and the ``--fail-on`` gates.

Gate expressions (no ``eval``; a small regular grammar):

* ``KIND`` -- trips if there is any finding of that kind, e.g. ``spurious_background``;
* ``KIND OP NUMBER`` -- compares the number of findings of that kind, e.g. ``label_issue>5``;
* ``severity OP NUMBER`` -- trips if any finding's severity satisfies it, e.g. ``severity>=0.7``;
* ``KEY OP NUMBER`` -- compares a numeric summary figure, e.g. ``worst_group_acc<0.8``,
  ``accuracy<0.9``, ``n_findings>0``;

with ``OP`` one of ``< <= > >= == !=``. An unknown name or a malformed expression raises
:class:`~biasscope.errors.BiasscopeError` naming the expression. A figure that is not available
for this scan (``mean_inside_frac`` without masks) does not trip its gate; the detail says so.
"""

from __future__ import annotations

import math
import operator
import re

import numpy as np
import pandas as pd

from biasscope.analysis import infer_attributes, to_jsonable
from biasscope.errors import BiasscopeError
from biasscope.findings import BANDS, REGISTRY, severity_band  # registers every detector

__all__ = ["summarise", "evaluate_gates", "verdict", "explained_by", "BANDS", "SHORTCUT_KINDS"]

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "!=": operator.ne}
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_COMPARE = re.compile(rf"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*({_NUMBER})\s*$")
_BARE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")


def _as_dict(f) -> dict:
    return f.to_dict() if hasattr(f, "to_dict") else dict(f)


#: Documented kinds that may be produced outside the detector registry (``background_reliance``
#: needs the model) or whose detector may not be registered in this build
#: (``spurious_feature``): a gate on them is valid even when this scan has none.
EXTRA_KINDS = ("background_reliance", "spurious_feature")

#: Finding kinds that name a shortcut, i.e. a reason the model is right (or wrong) for the wrong
#: reason; the verdict's root causes are drawn from these.
SHORTCUT_KINDS = ("spurious_feature", "clever_hans_cluster", "spurious_background", "background_reliance")

#: Root causes listed in the verdict, at most.
MAX_ROOT_CAUSES = 5
#: Severity from which a finding that is not a root cause still asks for a review.
REVIEW_SEVERITY = 0.7


def _known_kinds() -> list[str]:
    """Every known kind once: the registered detectors' kinds, then :data:`EXTRA_KINDS` (a
    detector registered later under one of those kinds is not listed twice)."""
    return list(dict.fromkeys([cls.kind for cls in REGISTRY.values()] + list(EXTRA_KINDS)))


def explained_by(f: dict) -> list[str]:
    """The ids in ``evidence["explained_by"]`` (a list, or one id as a string); [] if none."""
    ev = f.get("evidence")
    eb = ev.get("explained_by") if isinstance(ev, dict) else None
    if eb is None or eb == "":
        return []
    if isinstance(eb, str):
        return [eb]
    try:
        return [str(x) for x in eb if x is not None and str(x) != ""]
    except TypeError:
        return [str(eb)]


def _sentence(f: dict) -> str:
    """One sentence for a finding: ``evidence["verdict_line"]`` when it has one, else its title."""
    ev = f.get("evidence")
    line = ev.get("verdict_line") if isinstance(ev, dict) else None
    if isinstance(line, str) and line.strip():
        return " ".join(line.split())
    return " ".join(str(f.get("title") or f.get("id") or "").split())


def verdict(findings, *, min_severity: float = 0.5) -> dict:
    """The scan's verdict: which shortcut findings are root causes, in one headline.

    Pure: reads only the findings (``Finding`` objects or their stored dicts).

    Parameters
    ----------
    findings : list of Finding or of dicts
    min_severity : float in [0, 1]
        A shortcut finding is a root cause from this severity on.

    Returns
    -------
    dict (JSON-serialisable)
        ``status``: ``"shortcut"`` (at least one root cause), ``"review"`` (none, but some
        finding has severity >= 0.7) or ``"clean"``; ``line``: a one-sentence headline;
        ``root_causes``: up to 5 ``{id, kind, class, severity, line}``, highest severity first,
        drawn from findings whose kind is in :data:`SHORTCUT_KINDS`, with severity >=
        ``min_severity`` and no non-empty ``evidence["explained_by"]`` (``line`` is the
        finding's ``evidence["verdict_line"]`` when present, else its title);
        ``n_root_causes``: how many qualified (the list is capped); ``n_explained``: findings
        that another finding explains; ``n_review``: findings at severity >= 0.7 that are not
        root causes; ``min_severity``.
    """
    try:
        thr = float(min_severity)
    except (TypeError, ValueError):
        raise BiasscopeError(f"verdict: min_severity must be a number in [0, 1], got {min_severity!r}") from None
    if not (math.isfinite(thr) and 0.0 <= thr <= 1.0):
        raise BiasscopeError(f"verdict: min_severity must be in [0, 1], got {min_severity!r}")
    fs = [_as_dict(f) for f in findings or []]
    explained = [f for f in fs if explained_by(f)]
    roots = [f for f in fs if f.get("kind") in SHORTCUT_KINDS and float(f["severity"]) >= thr
             and not explained_by(f)]
    roots.sort(key=lambda f: (-float(f["severity"]), str(f.get("kind")), str(f.get("id"))))
    root_ids = {f.get("id") for f in roots}
    review = [f for f in fs if float(f["severity"]) >= REVIEW_SEVERITY and f.get("id") not in root_ids]
    shown = [{"id": f.get("id"), "kind": f.get("kind"), "class": f.get("class"),
              "severity": float(f["severity"]), "line": _sentence(f)} for f in roots[:MAX_ROOT_CAUSES]]
    if shown:
        status = "shortcut"
        n = len(roots)
        parts = [str(r["line"]).rstrip(" .;") for r in shown]
        if n > len(shown):
            parts.append(f"and {n - len(shown)} more")
        line = f"{n} root cause{'s' if n != 1 else ''}: " + "; ".join(parts)
    elif review:
        status = "review"
        line = (f"no shortcut found at severity >= {thr:g}; {len(review)} finding"
                f"{'s' if len(review) != 1 else ''} at severity >= {REVIEW_SEVERITY:g} to review")
    else:
        status = "clean"
        line = f"no shortcut found at severity >= {thr:g}"
    return to_jsonable({"status": status, "line": line, "root_causes": shown,
                        "n_root_causes": len(roots), "n_explained": len(explained),
                        "n_review": len(review), "min_severity": thr})


def _worst_group(table: pd.DataFrame, attributes) -> tuple[float | None, dict | None]:
    """Lowest accuracy over (labelled class, attribute value) groups; per-class accuracy
    minimum when there are no attributes."""
    correct = table["correct"].astype(bool)
    label = table["label"].astype(str)
    best = None
    if attributes:
        for a in attributes:
            v = table[a]
            ok = v.notna()
            acc = correct[ok].groupby([label[ok], v[ok].astype(str)], sort=True).agg(["mean", "size"])
            for (c, val), row in acc.iterrows():
                cand = (float(row["mean"]), {"class": c, "attribute": a, "value": val, "n": int(row["size"])})
                if best is None or cand[0] < best[0]:
                    best = cand
    else:
        acc = correct.groupby(label, sort=True).agg(["mean", "size"])
        for c, row in acc.iterrows():
            cand = (float(row["mean"]), {"class": c, "n": int(row["size"])})
            if best is None or cand[0] < best[0]:
                best = cand
    return (None, None) if best is None else best


def summarise(table: pd.DataFrame, findings, analysis: dict | None = None) -> dict:
    """Headline figures for ``summary.json`` and the gates.

    Parameters
    ----------
    table : DataFrame
        The scan table (``label``, ``correct``; ``inside_frac`` and attributes where present).
    findings : list of Finding or of dicts (as stored in ``findings.json``)
    analysis : dict, optional
        The analysis dict; its ``attributes`` name the attribute columns (else every non-core
        column is one).

    Returns
    -------
    dict (JSON-serialisable)
        ``n``, ``n_classes``, ``accuracy``, ``worst_group_acc``, ``worst_group`` (which group),
        ``mean_inside_frac`` (None without masks, or when every heatmap is zero),
        ``n_with_mask`` (images with a mask), ``heatmaps_all_zero``, ``n_findings``,
        ``max_severity``, ``findings_by_kind`` (every known kind, 0 included),
        ``findings_by_severity`` (``high`` >= 0.7, ``medium`` >= 0.4, ``low``), ``verdict``
        (:func:`verdict` of the findings: status, headline, root causes).
    """
    analysis = analysis or {}
    if not isinstance(table, pd.DataFrame) or "correct" not in table.columns or "label" not in table.columns:
        raise BiasscopeError("summarise needs the scan table with 'label' and 'correct' columns")
    attributes = analysis.get("attributes")
    if attributes is None:
        attributes = infer_attributes(table)
    attributes = [a for a in attributes if a in table.columns]
    fs = [_as_dict(f) for f in findings]
    n = len(table)
    inside = pd.to_numeric(table["inside_frac"], errors="coerce") if "inside_frac" in table.columns \
        else pd.Series(np.nan, index=table.index)
    masked = pd.to_numeric(table["mask_frac"], errors="coerce").notna() if "mask_frac" in table.columns \
        else inside.notna()
    peaks = pd.to_numeric(table["cam_max"], errors="coerce") if "cam_max" in table.columns else None
    worst, which = _worst_group(table, attributes)
    by_kind = {k: 0 for k in _known_kinds()}
    for f in fs:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    by_band = {name: 0 for name, _ in BANDS}
    for f in fs:
        by_band[severity_band(float(f["severity"]))] += 1
    return to_jsonable({
        "n": n,
        "n_classes": int(table["label"].nunique()),
        "accuracy": float(table["correct"].astype(bool).mean()) if n else None,
        "worst_group_acc": worst,
        "worst_group": which,
        "mean_inside_frac": float(inside.mean()) if inside.notna().any() else None,
        "n_with_mask": int(masked.sum()),
        # nothing to measure: zero CAMs have no inside share even where masks exist
        "heatmaps_all_zero": bool(n and peaks is not None and not (peaks > 0).any()),
        "n_findings": len(fs),
        "max_severity": max((float(f["severity"]) for f in fs), default=0.0),
        "findings_by_kind": by_kind,
        "findings_by_severity": by_band,
        "verdict": verdict(fs),
    })


def _parse(expr) -> tuple[str, str | None, float | None]:
    if not isinstance(expr, str):
        raise BiasscopeError(f"--fail-on expression must be a string, got {expr!r}")
    m = _COMPARE.match(expr)
    if m:
        return m.group(1), m.group(2), float(m.group(3))
    m = _BARE.match(expr)
    if m:
        return m.group(1), None, None
    raise BiasscopeError(f"--fail-on {expr!r}: malformed; expected KIND, severity>=X or KEY<X "
                         f"(operators < <= > >= == !=)")


def evaluate_gates(expr_list, summary: dict, findings) -> list[dict]:
    """Evaluate ``--fail-on`` expressions; returns ``[{expr, tripped, detail}]`` in order.

    Raises
    ------
    BiasscopeError
        For a malformed expression or an unknown name (naming the expression).
    """
    fs = [_as_dict(f) for f in findings]
    kinds = set(_known_kinds()) | set(summary.get("findings_by_kind", {})) | {f["kind"] for f in fs}
    numeric = {k for k, v in summary.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool)) or k in _NULLABLE}
    results = []
    for expr in expr_list or []:
        name, op, parsed = _parse(expr)
        value = float("nan") if parsed is None else parsed  # a number whenever op is set
        of_kind = [f for f in fs if f["kind"] == name]
        if op is None:
            if name not in kinds:
                hint = " (a summary figure needs a comparison, e.g. accuracy<0.9)" if name in numeric else ""
                raise BiasscopeError(f"--fail-on {expr!r}: unknown finding kind {name!r}{hint}; "
                                     f"known kinds: {sorted(kinds)}")
            top = max((float(f["severity"]) for f in of_kind), default=None)
            tripped = bool(of_kind)
            detail = (f"{len(of_kind)} finding(s) of kind {name} (highest severity {top:.2f})"
                      if tripped else f"no finding of kind {name}")
        elif name == "severity":
            hits = [f for f in fs if _OPS[op](float(f["severity"]), value)]
            tripped = bool(hits)
            detail = (f"{len(hits)} finding(s) with severity {op} {value:g}" +
                      (f", e.g. {hits[0]['id']} ({float(hits[0]['severity']):.2f})" if hits else ""))
        elif name in kinds:
            count = len(of_kind)
            tripped = bool(_OPS[op](count, value))
            detail = f"{count} finding(s) of kind {name} ({'' if tripped else 'not '}{op} {value:g})"
        elif name in numeric:
            actual = summary.get(name)
            if actual is None or (isinstance(actual, float) and math.isnan(actual)):
                tripped, detail = False, f"{name} is not available for this scan; gate not applied"
            else:
                tripped = bool(_OPS[op](float(actual), value))
                detail = f"{name} = {float(actual):.4g} ({'' if tripped else 'not '}{op} {value:g})"
        else:
            raise BiasscopeError(f"--fail-on {expr!r}: unknown name {name!r}; known: severity, "
                                 f"finding kinds {sorted(kinds)}, summary figures {sorted(numeric)}")
        results.append({"expr": expr, "tripped": tripped, "detail": detail})
    return results


def validate_gates(expr_list) -> None:
    """Raise :class:`BiasscopeError` for a malformed or unknown ``--fail-on`` expression."""
    dummy = {k: 0 for k in ("n", "n_classes", "accuracy", "worst_group_acc", "mean_inside_frac",
                            "n_with_mask", "n_findings", "max_severity")}
    evaluate_gates(expr_list, dummy, [])


#: Summary figures that may be None (not available) and are still valid gate names.
_NULLABLE = frozenset({"accuracy", "worst_group_acc", "mean_inside_frac", "max_severity"})
