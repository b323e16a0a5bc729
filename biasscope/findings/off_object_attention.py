"""``off_object_attention``: images whose Grad-CAM mass lies mostly off the object mask.

An image is flagged when ``inside_frac < 0.5`` (most attention outside the mask) **and**
``lift < 1`` (no more attention on the object than uniform attention would put there): the
second condition keeps large objects, where even good attention has some mass outside, from
being flagged. Both thresholds are options. Needs masks; skipped without any.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Detector, DetectorResult, register


@register
class OffObjectAttention(Detector):
    name = kind = "off_object_attention"
    needs_heatmaps = True
    scope = "image"
    description = "Most Grad-CAM mass outside the object mask and lift < 1, summarised per predicted class."

    def run(self, ctx: Context) -> DetectorResult:
        inside, lift = ctx.col("inside_frac"), ctx.col("lift")
        masked = np.isfinite(inside) & np.isfinite(lift)
        if not masked.any():
            return DetectorResult.skip("no masks: inside_frac is missing for every image")
        thr_in, thr_lift = float(ctx.options["off_object_inside"]), float(ctx.options["off_object_lift"])
        flags = masked & (inside < thr_in) & (lift < thr_lift)
        scores = np.where(masked, np.clip(1.0 - inside, 0.0, 1.0), np.nan)
        correct = ctx.correct
        pred = ctx.strings("pred")
        findings = []
        # Grouped by *predicted* class: the CAM explains the prediction.
        for c in ctx.classes + sorted(set(pred) - set(ctx.classes)):
            rows = np.flatnonzero((pred == c) & masked)
            off = rows[flags[rows]]
            if not len(off):
                continue
            rate = len(off) / len(rows)
            findings.append(self.finding(
                # Half of a class's predictions made looking off the object is fully severe.
                severity=min(1.0, rate / 0.5),
                title=f"{len(off)} of {len(rows)} predictions of '{c}' attend mostly off the object",
                class_=c, scope="class",
                evidence={"n_with_mask": len(rows), "n_off_object": len(off), "rate": rate,
                          "n_off_object_correct": int(correct[off].sum()),
                          "mean_inside_frac_off": float(inside[off].mean()),
                          "mean_lift_off": float(lift[off].mean()),
                          "thresholds": {"inside_frac": thr_in, "lift": thr_lift}},
                # Correct-but-off-object first ("right for the wrong reasons"), then lowest inside_frac.
                examples=ctx.examples(off, order=correct[off] * 2.0 + (1.0 - inside[off])),
            ))
        return DetectorResult(scores=scores, flags=flags, findings=findings)
