"""Comparing two stored scans of the same images (DESIGN section 10): is the candidate model
better than the baseline, and for the right reasons?

``compare(baseline, candidate, fail_on=...)`` reads two finished scans (paths or
:class:`~biasscope.store.Scan` objects; no TensorFlow), pairs their images by ``path`` and
returns a :class:`Comparison` whose ``result`` is the JSON-serialisable dict written as
``compare.json``:

* ``per_class`` / ``overall``: baseline and candidate accuracy, ``delta_accuracy`` with a paired
  bootstrap 95% CI, the exact McNemar ``p_value`` (two-sided binomial test on the discordant
  pairs), paired bootstrap deltas of mean ``inside_frac``, ``lift`` and ``pointing_hit`` where
  both scans have masks, and the BG-gap / Only-BG rate of both scans' counterfactual tests where
  both have them; ``overall`` adds the worst-group accuracy delta when the scans have attributes;
* ``flips``: images right in the baseline and wrong in the candidate (``right_to_wrong``) and
  the reverse, overall and per class, with their paths (lists capped at 200; counts exact);
* ``findings``: the two scans' findings matched by (kind, class, cluster, group) into ``new``,
  ``resolved``, ``worse`` / ``better`` (severity changed by at least 0.1) and ``unchanged``;
* ``attention_shift``: per class, the mean change of ``inside_frac`` and the share of images
  whose ``inside_frac`` dropped by more than 0.2 (with masks), or whose CAM centre of mass moved
  by more than 0.25 image widths (without);
* ``gates``, ``verdict``, ``warnings``.

``Comparison.write(out)`` writes ``compare.json`` and ``compare.html`` (the report's stack:
``biasscope/report/compare.py``).

Gate expressions (no ``eval``; a small regular grammar):

* ``regressed`` -- any new or worse finding at severity >= 0.4, or any class whose accuracy
  drops with McNemar p < 0.05;
* ``new:KIND`` -- any new finding of that kind (a worse one does not count);
* ``delta.FIGURE OP NUMBER`` and ``delta.FIGURE[CLASS] OP NUMBER`` -- the candidate minus the
  baseline value of ``accuracy``, ``inside_frac``, ``lift``, ``pointing_hit``, ``bg_gap``,
  ``only_bg_rate`` (overall, or of one class) or ``worst_group_acc`` (overall only), with ``OP``
  one of ``< <= > >=``; a figure one of the scans lacks does not trip, the detail says so.

Bootstraps are seeded (1000 resamples, seed 0 by default): the same scans give the same file.
Cluster numbers are each scan's own, so clusters are matched by number only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import BiasscopeError
from .store import Scan, load, write_file, write_json

__all__ = ["compare", "Comparison", "parse_gates", "mcnemar_exact", "paired_bootstrap", "FIGURES"]

#: Figures a ``delta.`` gate may name; ``worst_group_acc`` has no per-class value.
FIGURES = ("accuracy", "inside_frac", "lift", "pointing_hit", "bg_gap", "only_bg_rate", "worst_group_acc")
#: A finding counts as worse / better when its severity moved by at least this much.
SEVERITY_STEP = 0.1
#: ``regressed`` trips on a new or worse finding from this severity on ...
REGRESSED_SEVERITY = 0.4
#: ... or on a class whose accuracy drops with a McNemar p-value below this.
REGRESSED_P = 0.05
#: Image paths listed per flip list, at most (counts are always exact).
MAX_PATHS = 200
#: An image's attention moved off the object when its inside_frac dropped by more than this ...
INSIDE_DROP = 0.2
#: ... or, without masks, when its CAM centre of mass moved by more than this many image widths.
CENTRE_SHIFT = 0.25

_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b}
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_DELTA = re.compile(rf"^\s*delta\.([A-Za-z_]+)(?:\[([^\]]+)\])?\s*(<=|>=|<|>)\s*({_NUMBER})\s*$")
_NEW = re.compile(r"^\s*new:([A-Za-z_][A-Za-z0-9_]*)\s*$")
_METRICS = ("inside_frac", "lift", "pointing_hit")
_CF = ("bg_gap", "only_bg_rate")


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar test: the two-sided binomial p-value of the discordant pairs at 0.5
    (1.0 when there are none)."""
    b, c = int(right_to_wrong), int(wrong_to_right)
    if b < 0 or c < 0:
        raise BiasscopeError(f"mcnemar_exact: counts must be >= 0, got {b}, {c}")
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5).pvalue)


def paired_bootstrap(base, cand, *, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Paired bootstrap of ``mean(cand) - mean(base)`` over the pairs where both are defined.

    Parameters
    ----------
    base, cand : array-like of shape (n,)
        One value per paired image (NaN: undefined, the pair is left out).

    Returns
    -------
    dict or None
        ``baseline``, ``candidate`` (means over the defined pairs), ``delta``, ``ci`` (95%
        percentile interval of the resampled deltas), ``n``; None when no pair is defined.
    """
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if b.shape != c.shape or b.ndim != 1:
        raise BiasscopeError(f"paired_bootstrap: base and cand must be 1-D of one length: shapes {b.shape}, {c.shape}")
    ok = np.isfinite(b) & np.isfinite(c)
    b, c = b[ok], c[ok]
    n = len(b)
    if n == 0:
        return None
    d = c - b
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    step = max(1, 2_000_000 // n)  # resample in blocks: bounded memory for large scans
    for lo in range(0, int(n_boot), step):
        hi = min(int(n_boot), lo + step)
        means[lo:hi] = d[rng.integers(0, n, (hi - lo, n))].mean(axis=1)
    lo_ci, hi_ci = np.percentile(means, [2.5, 97.5])
    return {"baseline": float(b.mean()), "candidate": float(c.mean()), "delta": float(d.mean()),
            "ci": [float(lo_ci), float(hi_ci)], "n": int(n)}


def _centres(heat: np.ndarray) -> np.ndarray:
    """CAM centres of mass (N, 2) as (y, x) fractions of the image height and width; NaN for an
    all-zero CAM."""
    h = np.maximum(np.asarray(heat, dtype=np.float64), 0.0)
    _, hh, ww = h.shape
    mass = h.sum(axis=(1, 2))
    ys = (np.arange(hh) + 0.5) / hh
    xs = (np.arange(ww) + 0.5) / ww
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (h.sum(axis=2) * ys).sum(axis=1) / mass
        cx = (h.sum(axis=1) * xs).sum(axis=1) / mass
    out = np.stack([cy, cx], axis=1)
    out[~(mass > 0)] = np.nan
    return out


# ----------------------------------------------------------------------------------------------
# gates
# ----------------------------------------------------------------------------------------------


def parse_gates(expr_list, *, classes=None, kinds=None) -> list[dict]:
    """Parse ``fail_on`` expressions into ``{expr, type, ...}`` dicts.

    ``classes`` and ``kinds`` (when given) are the valid class names and finding kinds.

    Raises
    ------
    BiasscopeError
        For a malformed expression, an unknown figure, kind or class (naming the expression).
    """
    gates: list[dict] = []
    for expr in expr_list or []:
        if not isinstance(expr, str):
            raise BiasscopeError(f"--fail-on expression must be a string, got {expr!r}")
        if expr.strip() == "regressed":
            gates.append({"expr": expr, "type": "regressed"})
            continue
        m = _NEW.match(expr)
        if m:
            kind = m.group(1)
            if kinds is not None and kind not in kinds:
                raise BiasscopeError(f"--fail-on {expr!r}: unknown finding kind {kind!r}; known kinds: {sorted(kinds)}")
            gates.append({"expr": expr, "type": "new", "kind": kind})
            continue
        m = _DELTA.match(expr)
        if m:
            figure, cls, op, value = m.group(1), m.group(2), m.group(3), float(m.group(4))
            if figure not in FIGURES:
                raise BiasscopeError(f"--fail-on {expr!r}: unknown figure {figure!r}; known: {list(FIGURES)}")
            if cls is not None and figure == "worst_group_acc":
                raise BiasscopeError(f"--fail-on {expr!r}: worst_group_acc has no per-class value")
            if cls is not None and classes is not None and cls not in classes:
                raise BiasscopeError(f"--fail-on {expr!r}: unknown class {cls!r}; classes: {list(classes)}")
            gates.append({"expr": expr, "type": "delta", "figure": figure, "class": cls, "op": op,
                          "value": value})
            continue
        raise BiasscopeError(f"--fail-on {expr!r}: malformed; expected regressed, new:KIND or "
                             f"delta.FIGURE<X / delta.FIGURE[CLASS]<X (operators < <= > >=)")
    return gates


def _known_kinds(*scans) -> set:
    from .summary import _known_kinds as registry_kinds  # the detector registry; no TensorFlow

    kinds = set(registry_kinds())
    for s in scans:
        kinds |= {str(f.get("kind")) for f in s.findings}
    return kinds


def _figure(result: dict, figure: str, cls: str | None) -> float | None:
    if figure == "worst_group_acc":
        wg = result["overall"].get("worst_group_acc")
        return None if wg is None else wg["delta"]
    block = result["overall"] if cls is None else result["per_class"][cls]
    if figure == "accuracy":
        return block["delta_accuracy"]
    entry = block.get(figure)
    return None if entry is None else entry["delta"]


def _regressions(result: dict) -> list[str]:
    reasons = []
    for bucket in ("new", "worse"):
        for f in result["findings"][bucket]:
            if float(f["candidate_severity"]) >= REGRESSED_SEVERITY:
                reasons.append(f"{bucket} {f['kind']} finding on {f['class']} at {float(f['candidate_severity']):.2f}")
    for c, row in result["per_class"].items():
        if row["delta_accuracy"] is not None and row["delta_accuracy"] < 0 and row["p_value"] < REGRESSED_P:
            reasons.append(f"{c} accuracy {row['delta_accuracy']:+.3f} (McNemar p = {row['p_value']:.2g})")
    return reasons


def _evaluate(gates: list[dict], result: dict) -> list[dict]:
    out = []
    for g in gates:
        if g["type"] == "regressed":
            reasons = _regressions(result)
            tripped = bool(reasons)
            detail = ("; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
                      if reasons else "no new or worse finding at >= 0.4, no significant accuracy drop")
        elif g["type"] == "new":
            hits = [f for f in result["findings"]["new"] if f["kind"] == g["kind"]]
            tripped = bool(hits)
            detail = (f"{len(hits)} new {g['kind']} finding(s) (highest severity "
                      f"{max(float(f['candidate_severity']) for f in hits):.2f})" if hits
                      else f"no new {g['kind']} finding")
        else:
            name = f"delta.{g['figure']}" + (f"[{g['class']}]" if g["class"] else "")
            actual = _figure(result, g["figure"], g["class"])
            if actual is None:
                tripped, detail = False, f"{name} is not available for these scans; gate not applied"
            else:
                tripped = bool(_OPS[g["op"]](actual, g["value"]))
                detail = f"{name} = {actual:+.4g} ({'' if tripped else 'not '}{g['op']} {g['value']:g})"
        out.append({"expr": g["expr"], "tripped": tripped, "detail": detail})
    return out


# ----------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The comparison of two scans; ``result`` is the ``compare.json`` dict."""

    baseline: Scan
    candidate: Scan
    result: dict = field(default_factory=dict)

    @property
    def gates(self) -> list:
        return self.result["gates"]

    @property
    def tripped(self) -> bool:
        return any(g["tripped"] for g in self.gates)

    @property
    def verdict(self) -> str:
        return self.result["verdict"]["status"]

    def write(self, out_dir, *, html: bool = True) -> Path:
        """Write ``OUT/compare.json`` and (``html``) ``OUT/compare.html``; returns the JSON's path."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise BiasscopeError(f"--out {out} is a file")
        out.mkdir(parents=True, exist_ok=True)
        path = out / "compare.json"
        write_json(path, self.result)
        if html:
            self.write_html(out / "compare.html")
        return path

    def write_html(self, path) -> Path:
        """The self-contained offline page (verdict, per-class deltas, findings diff, flips,
        attention shift); returns its path."""
        from .report.compare import write_compare_html

        return write_compare_html(self.result, path, self.baseline, self.candidate)

    def to_markdown(self) -> str:
        """A short summary for a pull request or a CI job summary."""
        return to_markdown(self.result)

    def write_markdown(self, path) -> Path:
        return write_file(path, self.to_markdown().encode("utf-8"))

    def write_junit(self, path) -> Path:
        """One JUnit test case per gate, failed when it tripped."""
        return write_file(path, to_junit(self.result))


def _as_scan(x, role: str) -> Scan:
    if isinstance(x, Scan):
        return x
    if isinstance(x, (str, Path)):
        return load(x)
    raise BiasscopeError(f"compare: the {role} must be a scan directory or a Scan, got {type(x).__name__}")


def _num(x) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _col(t: pd.DataFrame, name: str) -> np.ndarray:
    if name not in t.columns:
        return np.full(len(t), np.nan)
    return pd.to_numeric(t[name], errors="coerce").to_numpy(dtype=np.float64)


def _paths(series: pd.Series) -> list:
    return [str(p) for p in series.iloc[:MAX_PATHS]]


def _flip_lists(paths: pd.Series, base_ok: np.ndarray, cand_ok: np.ndarray) -> dict:
    r2w = base_ok & ~cand_ok
    w2r = ~base_ok & cand_ok
    return {"right_to_wrong": {"count": int(r2w.sum()), "paths": _paths(paths[r2w])},
            "wrong_to_right": {"count": int(w2r.sum()), "paths": _paths(paths[w2r])}}


def _cf_classes(scan: Scan) -> dict:
    cf = (scan.analysis or {}).get("counterfactuals") or {}
    classes = cf.get("classes") if isinstance(cf, dict) else None
    return classes if isinstance(classes, dict) else {}


def _block(sel: np.ndarray, tb: pd.DataFrame, tc: pd.DataFrame, *, n_boot: int, seed: int,
           cf: tuple[dict, dict] | None) -> dict:
    """Accuracy, McNemar and the metric deltas of the paired rows ``sel``."""
    bo = tb["correct"].to_numpy(dtype=bool)[sel]
    co = tc["correct"].to_numpy(dtype=bool)[sel]
    r2w, w2r = int((bo & ~co).sum()), int((~bo & co).sum())
    acc = paired_bootstrap(bo.astype(float), co.astype(float), n_boot=n_boot, seed=seed)
    row = {"n": int(sel.sum()),
           "baseline_accuracy": None if acc is None else acc["baseline"],
           "candidate_accuracy": None if acc is None else acc["candidate"],
           "delta_accuracy": None if acc is None else acc["delta"],
           "delta_accuracy_ci": None if acc is None else acc["ci"],
           "right_to_wrong": r2w, "wrong_to_right": w2r,
           "p_value": mcnemar_exact(r2w, w2r)}
    for m in _METRICS:
        row[m] = paired_bootstrap(_col(tb, m)[sel], _col(tc, m)[sel], n_boot=n_boot, seed=seed)
    for m in _CF:  # None where a scan has no background tests (and always overall)
        b, c = (None, None) if cf is None else (_num(cf[0].get(m)), _num(cf[1].get(m)))
        row[m] = None if b is None or c is None else {"baseline": b, "candidate": c, "delta": c - b}
    return row


def _finding_key(f: dict) -> tuple:
    g = f.get("group")
    group = (str(g.get("attribute")), str(g.get("value"))) if isinstance(g, dict) else (None if g is None else str(g))
    cluster = f.get("cluster")
    return (str(f.get("kind")), None if f.get("class") is None else str(f.get("class")),
            None if cluster is None else str(cluster), group)


def _diff_findings(base: list, cand: list) -> dict:
    def keyed(fs):
        out: dict = {}
        for f in sorted(fs, key=lambda f: -float(f.get("severity") or 0.0)):
            k = _finding_key(f)
            n = sum(1 for kk in out if kk[:-1] == k)  # a second finding under one key pairs with the second
            out[k + (n,)] = f
        return out

    kb, kc = keyed(base), keyed(cand)
    buckets: dict = {b: [] for b in ("new", "resolved", "worse", "better", "unchanged")}
    for k in list(kb) + [k for k in kc if k not in kb]:
        fb, fc = kb.get(k), kc.get(k)
        ref = fc if fc is not None else fb
        entry = {"kind": ref.get("kind"), "class": ref.get("class"), "cluster": ref.get("cluster"),
                 "group": ref.get("group"),
                 "baseline_severity": None if fb is None else float(fb["severity"]),
                 "candidate_severity": None if fc is None else float(fc["severity"]),
                 "baseline_title": None if fb is None else fb.get("title"),
                 "candidate_title": None if fc is None else fc.get("title"),
                 "baseline_id": None if fb is None else fb.get("id"),
                 "candidate_id": None if fc is None else fc.get("id")}
        if fb is None:
            bucket = "new"
        elif fc is None:
            bucket = "resolved"
        else:
            d = round(float(fc["severity"]) - float(fb["severity"]), 6)
            bucket = "worse" if d >= SEVERITY_STEP else ("better" if d <= -SEVERITY_STEP else "unchanged")
        buckets[bucket].append(entry)
    for entries in buckets.values():
        entries.sort(key=lambda e: -max(e["candidate_severity"] or 0.0, e["baseline_severity"] or 0.0))
    return buckets


def _attention_shift(classes, labels, tb, tc, hb, hc, *, masks: bool) -> dict:
    inside_d = _col(tc, "inside_frac") - _col(tb, "inside_frac")
    moved = np.linalg.norm(_centres(hc) - _centres(hb), axis=1)
    out = {}
    for c in classes:
        sel = labels == c
        row: dict = {"n": int(sel.sum())}
        d = inside_d[sel]
        d = d[np.isfinite(d)]
        if masks and len(d):
            row.update(method="inside_frac", mean_delta_inside_frac=float(d.mean()),
                       share_moved_off=float((d < -INSIDE_DROP).mean()), n_measured=int(len(d)))
        else:
            mv = moved[sel]
            mv = mv[np.isfinite(mv)]
            row.update(method="cam_centre", mean_delta_inside_frac=None,
                       share_moved_off=float((mv > CENTRE_SHIFT).mean()) if len(mv) else None,
                       n_measured=int(len(mv)))
        mv = moved[sel]
        mv = mv[np.isfinite(mv)]
        row["mean_centre_shift"] = float(mv.mean()) if len(mv) else None
        out[c] = row
    return out


def _attributes(scan: Scan) -> list:
    a = scan.meta.get("attributes")
    if a is None:
        a = (scan.analysis or {}).get("attributes")
    return [str(x) for x in (a or []) if str(x) in scan.table.columns]


def _verdict(result: dict) -> dict:
    """``regression`` when ``regressed`` would trip or any requested gate tripped; ``review``
    when there is a new or worse finding below 0.4, or more right-to-wrong than wrong-to-right
    flips; else ``no regression``."""
    reasons = _regressions(result)
    tripped = [g["expr"] for g in result["gates"] if g["tripped"]]
    if reasons or tripped:
        status = "regression"
        line = "; ".join(reasons[:3]) if reasons else "gate " + ", ".join(tripped) + " tripped"
    else:
        review = []
        n_new = len(result["findings"]["new"]) + len(result["findings"]["worse"])
        if n_new:
            review.append(f"{n_new} new or worse finding(s) below {REGRESSED_SEVERITY:g}")
        f = result["flips"]
        if f["right_to_wrong"]["count"] > f["wrong_to_right"]["count"]:
            review.append(f"{f['right_to_wrong']['count']} right-to-wrong vs "
                          f"{f['wrong_to_right']['count']} wrong-to-right flips")
        status = "review" if review else "no regression"
        line = "; ".join(review) if review else "no new or worse finding, no more images lost than gained"
    return {"status": status, "line": line}


def compare(baseline, candidate, *, fail_on=(), n_boot: int = 1000, seed: int = 0) -> Comparison:
    """Compare two stored scans of the same images; see the module docstring.

    Parameters
    ----------
    baseline, candidate : str, Path or Scan
        Finished scan directories (``biasscope scan --out``) or loaded scans.
    fail_on : list of str
        Gate expressions (module docstring); checked before the comparison is computed.
    n_boot, seed : int
        Bootstrap resamples and their seed.

    Raises
    ------
    BiasscopeError
        A malformed or unknown gate, an input that is not a finished scan, scans with no image
        in common or with different class sets.
    """
    if isinstance(fail_on, str):
        fail_on = [fail_on]
    parse_gates(fail_on)  # syntax and figure names first, before reading anything
    b, c = _as_scan(baseline, "baseline"), _as_scan(candidate, "candidate")
    if set(b.classes) != set(c.classes):
        only_b = sorted(set(b.classes) - set(c.classes))
        only_c = sorted(set(c.classes) - set(b.classes))
        raise BiasscopeError(f"the scans have different classes: only in the baseline {only_b}, "
                             f"only in the candidate {only_c}")
    classes = list(b.classes)
    gates = parse_gates(fail_on, classes=classes, kinds=_known_kinds(b, c))
    warnings: list[str] = []

    def positions(scan: Scan, role: str) -> pd.Series:
        paths = scan.table["path"].astype(str)
        dup = paths.duplicated()
        if dup.any():
            warnings.append(f"{int(dup.sum())} duplicate image path(s) in the {role} scan; the first of each is used")
        return pd.Series(np.arange(len(paths)), index=paths)[~dup.to_numpy()]

    pb, pc = positions(b, "baseline"), positions(c, "candidate")
    common = pb.index.intersection(pc.index, sort=False)
    if len(common) == 0:
        raise BiasscopeError(f"the scans have no image in common (matched by path): {b.path} and {c.path}")
    if len(common) < len(pb) or len(common) < len(pc):
        warnings.append(f"partial overlap: comparing the {len(common):,} images in both scans; "
                        f"{len(pb) - len(common):,} only in the baseline, {len(pc) - len(common):,} only in the candidate")
    ib, ic = pb[common].to_numpy(), pc[common].to_numpy()
    tb = b.table.iloc[ib].reset_index(drop=True)
    tc = c.table.iloc[ic].reset_index(drop=True)
    labels = tb["label"].astype(str).to_numpy()
    relabelled = labels != tc["label"].astype(str).to_numpy()
    if relabelled.any():
        warnings.append(f"{int(relabelled.sum())} paired image(s) carry another label in the candidate; "
                        "grouped by the baseline's label, each scan's own correctness used")
    masks = bool(np.isfinite(_col(tb, "inside_frac")).any() and np.isfinite(_col(tc, "inside_frac")).any())
    if not masks and (np.isfinite(_col(tb, "inside_frac")).any() or np.isfinite(_col(tc, "inside_frac")).any()):
        warnings.append("only one scan has masks: no inside_frac, lift or pointing-game deltas")
    cfb, cfc = _cf_classes(b), _cf_classes(c)

    per_class = {}
    for cls in classes:
        sel = labels == cls
        both_cf = (cfb[cls], cfc[cls]) if isinstance(cfb.get(cls), dict) and isinstance(cfc.get(cls), dict) else None
        per_class[cls] = _block(sel, tb, tc, n_boot=n_boot, seed=seed, cf=both_cf)
    overall = _block(np.ones(len(tb), bool), tb, tc, n_boot=n_boot, seed=seed, cf=None)
    attrs = [a for a in _attributes(b) if a in _attributes(c)]
    overall["worst_group_acc"] = None
    if attrs:
        from .summary import _worst_group

        wb, gb = _worst_group(tb, attrs)
        wc, gc = _worst_group(tc.assign(label=tb["label"]), attrs)
        if wb is not None and wc is not None:
            overall["worst_group_acc"] = {"baseline": wb, "candidate": wc, "delta": wc - wb,
                                          "baseline_group": gb, "candidate_group": gc,
                                          "attributes": attrs}

    paths = tb["path"].astype(str)
    flips = _flip_lists(paths, tb["correct"].to_numpy(dtype=bool), tc["correct"].to_numpy(dtype=bool))
    flips["per_class"] = {}
    for cls in classes:
        sel = labels == cls
        flips["per_class"][cls] = _flip_lists(paths[sel].reset_index(drop=True),
                                              tb["correct"].to_numpy(dtype=bool)[sel],
                                              tc["correct"].to_numpy(dtype=bool)[sel])

    hb = np.asarray(b.heatmaps[ib], dtype=np.float32)
    hc = np.asarray(c.heatmaps[ic], dtype=np.float32)
    result = {
        "baseline": {"path": str(b.path), "model": (b.meta.get("model") or {}).get("name"), "n": len(b.table)},
        "candidate": {"path": str(c.path), "model": (c.meta.get("model") or {}).get("name"), "n": len(c.table)},
        "n_paired": int(len(common)),
        "classes": classes,
        "options": {"n_boot": int(n_boot), "seed": int(seed), "severity_step": SEVERITY_STEP,
                    "inside_drop": INSIDE_DROP, "centre_shift": CENTRE_SHIFT},
        "per_class": per_class,
        "overall": overall,
        "flips": flips,
        "findings": _diff_findings(list(b.findings), list(c.findings)),
        "attention_shift": _attention_shift(classes, labels, tb, tc, hb, hc, masks=masks),
        "warnings": warnings,
    }
    result["gates"] = _evaluate(gates, result)
    result["verdict"] = _verdict(result)
    return Comparison(baseline=b, candidate=c, result=json.loads(json.dumps(result, default=_jsonable)))


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return _num(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------------
# CI outputs
# ----------------------------------------------------------------------------------------------


def _md(s) -> str:
    """Markdown table cell text: no pipes or newlines, angle brackets escaped."""
    return (str(s).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " "))


def _code(s) -> str:
    """Markdown code span text (inside backticks entities are not decoded)."""
    return str(s).replace("`", "'").replace("|", "\\|").replace("\n", " ")


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _signed(x, ci=None) -> str:
    if x is None:
        return "-"
    s = f"{x:+.3f}"
    return s + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


#: Classes listed in the Markdown summary and on the terminal, at most (the lowest accuracy
#: deltas first when there are more); compare.json and compare.html list every class.
MAX_CLASSES_SHOWN = 20


def shown_classes(result: dict, limit: int = MAX_CLASSES_SHOWN) -> list:
    """``[(class, per_class row)]``: every class in order, or the ``limit`` with the lowest
    accuracy delta when there are more."""
    rows = list(result["per_class"].items())
    if len(rows) <= limit:
        return rows
    def key(item):
        d = item[1]["delta_accuracy"]
        return (d is None, d if d is not None else 0.0)
    return sorted(rows, key=key)[:limit]


def to_markdown(result: dict) -> str:
    """A short Markdown summary of a comparison result."""
    v = result["verdict"]
    f = result["flips"]
    lines = [f"## biasscope compare: {v['status']}", "", _md(v["line"]), "",
             f"{result['n_paired']:,} paired images; {f['right_to_wrong']['count']} right to wrong, "
             f"{f['wrong_to_right']['count']} wrong to right.", "",
             *([f"The {MAX_CLASSES_SHOWN} of {len(result['per_class'])} classes with the lowest accuracy delta:", ""]
               if len(result["per_class"]) > MAX_CLASSES_SHOWN else []),
             "| class | baseline | candidate | delta accuracy [95% CI] | McNemar p | delta inside_frac |",
             "|---|---|---|---|---|---|"]
    rows = shown_classes(result) + [("all", result["overall"])]
    for cls, r in rows:
        inside = r.get("inside_frac")
        lines.append(f"| {_md(cls)} | {_pct(r['baseline_accuracy'])} | {_pct(r['candidate_accuracy'])} | "
                     f"{_signed(r['delta_accuracy'], r['delta_accuracy_ci'])} | {r['p_value']:.3g} | "
                     f"{_signed(None if inside is None else inside['delta'])} |")
    wg = result["overall"].get("worst_group_acc")
    if wg:
        lines += ["", f"Worst-group accuracy: {_pct(wg['baseline'])} -> {_pct(wg['candidate'])} ({wg['delta']:+.3f})."]
    fd = result["findings"]
    lines += ["", "Findings: " + ", ".join(f"{len(fd[k])} {k}" for k in ("new", "worse", "better", "resolved", "unchanged")) + "."]
    for k in ("new", "worse"):
        for e in fd[k][:10]:
            old = "" if e["baseline_severity"] is None else f"{e['baseline_severity']:.2f} -> "
            lines.append(f"- {k}: `{_code(e['kind'])}` {_md(e['class'])} {old}{e['candidate_severity']:.2f}: "
                         f"{_md(e['candidate_title'])}")
    if result["gates"]:
        lines += ["", "| gate | result | detail |", "|---|---|---|"]
        for g in result["gates"]:
            lines.append(f"| `{_code(g['expr'])}` | {'**tripped**' if g['tripped'] else 'ok'} | {_md(g['detail'])} |")
    for w in result["warnings"]:
        lines += ["", f"Warning: {_md(w)}"]
    return "\n".join(lines) + "\n"


def to_junit(result: dict) -> bytes:
    """JUnit XML: one test case per gate, with a ``failure`` element when it tripped."""
    import xml.etree.ElementTree as ET

    gates = result["gates"]
    n_fail = sum(1 for g in gates if g["tripped"])
    suites = ET.Element("testsuites", name="biasscope compare", tests=str(len(gates)), failures=str(n_fail))
    suite = ET.SubElement(suites, "testsuite", name="biasscope compare", tests=str(len(gates)),
                          failures=str(n_fail), errors="0", skipped="0")
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname="biasscope.compare", name=str(g["expr"]))
        if g["tripped"]:
            ET.SubElement(case, "failure", message=str(g["detail"]), type="gate").text = str(g["detail"])
        else:
            ET.SubElement(case, "system-out").text = str(g["detail"])
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True)
