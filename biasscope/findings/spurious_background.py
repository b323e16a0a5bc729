"""``spurious_background``: classes the model recognises from their background.

Per class, over its *correctly classified* images with a mask (the predictions that are right,
and possibly for the wrong reason), the mean ``inside_frac`` is compared with the median of the
other classes' means. From attention alone, a class is flagged when

* it is at least ``spurious_min_drop`` (0.15) below that median **and** its inside_frac values
  are significantly lower than the other classes' (one-sided Mann-Whitney U test, Bonferroni-
  corrected over the classes tested, level ``alpha``), or
* its mean ``lift`` is at most 1: on average its object gets no more attention than uniform
  attention would give it (an absolute test, which also works with a single class).

Severity: ``min(1, drop / 0.4)`` for the relative test, ``min(1, 0.4 + 1.2 * (1 - lift))`` for
the absolute one (lift 1 -> 0.4, lift 0.5 -> 1.0); the larger applies.

Counterfactual backing. Attention is correlational; the background tests of
:mod:`biasscope.counterfactuals` (``ctx.counterfactuals["classes"][class]``) are causal. A class
whose **BG-gap counts** (CI above 0, and at least ``background_min_gap`` or with at least
``background_min_flip`` of its correct predictions flipping: the test of
``background_reliance``, :func:`~biasscope.findings.background_reliance.gap_counts`) is
reported even when the attention tests above are not met, with

    severity = max(attention severity, 1 - (1 - min(1, bg_gap / 0.5)) * (1 - partial))

where ``partial`` is the attention evidence without its significance requirements,
``max(min(1, max(drop, 0) / 0.4), lift severity if lift <= 1)``: a borderline attention drop
raises the severity, attention clearly on the object leaves the gap's own. A class with neither
an attention signal nor a BG-gap that counts is not reported; the counterfactual figures, when
present, are in the evidence (``counterfactuals``) of every finding.
"""

from __future__ import annotations

import numpy as np

from .background_reliance import counterfactual_classes, gap_counts
from .base import Context, Detector, DetectorResult, register


@register
class SpuriousBackground(Detector):
    name = kind = "spurious_background"
    needs_heatmaps = True
    scope = "class"
    description = "Classes whose correct predictions attend to the background more than other classes'."

    def run(self, ctx: Context) -> DetectorResult:
        inside, lift = ctx.col("inside_frac"), ctx.col("lift")
        if not np.isfinite(inside).any():
            return DetectorResult.skip("no masks: inside_frac is missing for every image")
        min_n = int(ctx.options["min_class_images"])
        label = ctx.strings("label")
        usable = ctx.correct & np.isfinite(inside)
        per_class = {c: np.flatnonzero(usable & (label == c)) for c in ctx.classes}
        per_class = {c: r for c, r in per_class.items() if len(r) >= min_n}
        cf, _ = counterfactual_classes(ctx)
        cf = cf or {}
        min_gap = float(ctx.options["background_min_gap"])
        min_flip = float(ctx.options["background_min_flip"])
        backed = {c for c in ctx.classes if gap_counts(cf.get(c), min_gap, min_flip)
                  and (cf[c].get("n") or 0) >= min_n}
        if not per_class and not backed:
            return DetectorResult.skip(f"no class has {min_n} correctly classified images with a mask")
        means = {c: float(inside[r].mean()) for c, r in per_class.items()}
        from scipy.stats import mannwhitneyu  # here: SciPy's statistics take 0.4-0.6 s to import

        alpha, min_drop = float(ctx.options["alpha"]), float(ctx.options["spurious_min_drop"])
        n_tests = len(per_class)  # Bonferroni: one test per class with enough images
        findings = []
        for c in [c for c in ctx.classes if c in per_class or c in backed]:
            rows = per_class.get(c, np.flatnonzero(usable & (label == c)))
            others = [o for o in per_class if o != c]
            m_lift = float(np.nanmean(lift[rows])) if np.isfinite(lift[rows]).any() else float("nan")
            m_inside = float(inside[rows].mean()) if len(rows) else float("nan")
            ev = {"n": len(rows), "mean_inside_frac": m_inside,
                  "median_inside_frac": float(np.median(inside[rows])) if len(rows) else None,
                  "mean_lift": m_lift}
            sev, partial = 0.0, 0.0
            if others and c in per_class:
                ref = float(np.median([means[o] for o in others]))
                rest = np.concatenate([per_class[o] for o in others])
                p = float(mannwhitneyu(inside[rows], inside[rest], alternative="less").pvalue)
                p_adj = min(1.0, p * n_tests)
                drop = ref - means[c]
                ev.update({"others_median_inside_frac": ref, "drop": drop, "p_value": p,
                           "p_adjusted": p_adj, "n_classes_compared": len(others)})
                partial = min(1.0, max(drop, 0.0) / 0.4)
                if drop >= min_drop and p_adj < alpha:
                    sev = max(sev, partial)
            if c in per_class and np.isfinite(m_lift) and m_lift <= 1.0:
                sev = max(sev, min(1.0, 0.4 + 1.2 * (1.0 - m_lift)))
                partial = max(partial, sev)
            ev["attention_severity"] = sev
            if c in cf:
                ev["counterfactuals"] = cf[c]
            if c in backed:
                gap_sev = min(1.0, float(cf[c]["bg_gap"]) / 0.5)
                sev = max(sev, 1.0 - (1.0 - gap_sev) * (1.0 - partial))
            ev["backed_by_counterfactuals"] = c in backed
            if sev <= 0.0:
                continue
            findings.append(self.finding(
                severity=sev, title=_title(c, ev, cf.get(c), c in backed, bool(others)),
                class_=c, evidence=ev,
                examples=ctx.examples(rows, order=1.0 - inside[rows]),
            ))
        return DetectorResult(findings=findings)


def _title(c, ev, figures, backed, compared) -> str:
    att = f"{ev['mean_inside_frac']:.0%} of attention on the object" if np.isfinite(
        ev["mean_inside_frac"]) else "attention not measured"
    if compared and "others_median_inside_frac" in ev:
        att += f" vs {ev['others_median_inside_frac']:.0%} for other classes"
    if backed and ev["attention_severity"] <= 0.0:
        return (f"'{c}' is recognised from its background: accuracy {figures['orig_acc']:.0%} -> "
                f"{figures['mixed_rand_acc']:.0%} on other backgrounds ({att})")
    title = f"'{c}' is recognised from its background: {att}"
    if backed:
        title += f"; BG-gap {figures['bg_gap']:.0%}"
    return title
