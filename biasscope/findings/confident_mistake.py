"""``confident_mistake``: wrong predictions made with high confidence (>= 0.9 by default).

A confident error is either a label error or a model that has learnt something it should not
have; either way it deserves a look before a lower-confidence one.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Detector, DetectorResult, register


@register
class ConfidentMistake(Detector):
    name = kind = "confident_mistake"
    scope = "image"
    description = "Wrong predictions at or above options['confident_threshold'] confidence."

    def run(self, ctx: Context) -> DetectorResult:
        if "confidence" not in ctx.table.columns:
            return DetectorResult.skip("the scan table has no confidence column")
        thr = float(ctx.options["confident_threshold"])
        conf = ctx.col("confidence")
        flags = ~ctx.correct & (conf >= thr)  # NaN confidence compares False
        label = ctx.strings("label")
        findings = []
        for c in ctx.classes + sorted(set(label) - set(ctx.classes)):
            rows = np.flatnonzero(label == c)
            hit = rows[flags[rows]]
            if not len(hit):
                continue
            rate = len(hit) / len(rows)
            mean_conf = float(conf[hit].mean())
            findings.append(self.finding(
                # 10% of a class confidently wrong counts as fully severe, weighted by how sure
                # the model was (confidence >= thr, so the weight is between thr and 1).
                severity=min(1.0, rate / 0.1) * min(1.0, mean_conf),
                title=f"{len(hit)} '{c}' image(s) misclassified with confidence >= {thr:g}",
                class_=c, scope="class",
                evidence={"n": len(rows), "n_confident_wrong": len(hit), "rate": rate,
                          "mean_confidence": mean_conf, "threshold": thr},
                examples=ctx.examples(hit, order=conf[hit]),
            ))
        return DetectorResult(flags=flags, findings=findings)
