"""``misclassified``: wrong predictions, one finding per labelled class that has any."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .base import Context, Detector, DetectorResult, register


@register
class Misclassified(Detector):
    name = kind = "misclassified"
    scope = "image"
    description = "Images whose prediction differs from the label, summarised per class."

    def run(self, ctx: Context) -> DetectorResult:
        wrong = ~ctx.correct
        label, pred = ctx.strings("label"), ctx.strings("pred")
        conf = ctx.col("confidence")
        findings = []
        for c in ctx.classes + sorted(set(label) - set(ctx.classes)):
            rows = np.flatnonzero(label == c)
            bad = rows[wrong[rows]]
            if not len(bad):
                continue
            rate = len(bad) / len(rows)
            confused = Counter(pred[bad].tolist()).most_common(5)
            findings.append(self.finding(
                # An error rate of 50% or more is as bad as it gets (severity 1); 20% is medium.
                severity=min(1.0, 2.0 * rate),
                title=f"{len(bad)} of {len(rows)} '{c}' images misclassified ({rate:.0%})",
                class_=c, scope="class",
                evidence={"n": len(rows), "n_wrong": len(bad), "error_rate": rate,
                          "confused_with": dict(confused)},
                # Most confident errors first: they are the most surprising.
                examples=ctx.examples(bad, order=np.nan_to_num(conf[bad], nan=0.0)),
            ))
        return DetectorResult(flags=wrong, findings=findings)
