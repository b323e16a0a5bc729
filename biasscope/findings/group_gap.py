"""``group_gap``: attribute groups on which the model is markedly worse.

For each manifest attribute (``background``, ``site``, ...) and each labelled class, every
value's group (n >= ``group_min_n``) is compared with the rest of its class by a two-proportion
z-test (pooled variance, two-sided). The p-values of all tests are Holm-corrected together; a
group is a finding when its accuracy is at least ``group_min_gap`` below the rest's and the
corrected p-value is below ``alpha``. Comparing *within* a class matters: a class-balanced
validation set whose hard class happens to be on one background must not blame the background.

Severity = ``min(1, gap / 0.4) * (0.5 + 0.5 * min(1, -log10(p_holm) / 3))``: the size of the
gap, weighted up to full by significance (p_holm = 0.001 or smaller).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .base import Context, Detector, DetectorResult, register


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """z and two-sided p of H0: equal proportions ``k1/n1 == k2/n2`` (pooled variance)."""
    from scipy.stats import norm  # here: SciPy's statistics take 0.4-0.6 s to import

    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:  # all right or all wrong in both: no evidence of a difference
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / se
    return z, float(2 * norm.sf(abs(z)))


def holm(p) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return out


@register
class GroupGap(Detector):
    name = kind = "group_gap"
    scope = "group"
    description = ("(class, attribute value) groups with significantly lower accuracy than the "
                   "rest of their class.")

    def run(self, ctx: Context) -> DetectorResult:
        attrs = [a for a in ctx.attributes if a in ctx.table.columns]
        if not attrs:
            return DetectorResult.skip("no attributes in the manifest")
        min_n = int(ctx.options["group_min_n"])
        label, correct = ctx.strings("label"), ctx.correct
        tests = []
        for a in attrs:
            values = ctx.table[a]
            present = values.notna().to_numpy()
            vals = values.astype(str).to_numpy()
            df = pd.DataFrame({"c": label[present], "v": vals[present], "ok": correct[present]})
            groups = df.groupby(["c", "v"], sort=True)["ok"].agg(["size", "sum"])
            worst = float((groups["sum"] / groups["size"]).min()) if len(groups) else float("nan")
            for (c, v), g in groups.iterrows():
                n1, k1 = int(g["size"]), int(g["sum"])
                cls = groups.loc[c]
                n2, k2 = int(cls["size"].sum()) - n1, int(cls["sum"].sum()) - k1
                if n1 < min_n or n2 < min_n:
                    continue
                z, p = two_proportion_z(k1, n1, k2, n2)
                tests.append({"attribute": a, "value": v, "class": c, "n": n1, "accuracy": k1 / n1,
                              "rest_n": n2, "rest_accuracy": k2 / n2, "gap": k2 / n2 - k1 / n1,
                              "z": z, "p_value": p, "attribute_worst_group_acc": worst})
        if not tests:
            return DetectorResult.skip(f"no (class, attribute value) group has {min_n} images "
                                       f"and a rest of its class as large")
        p_adj = holm([t["p_value"] for t in tests])
        alpha, min_gap = float(ctx.options["alpha"]), float(ctx.options["group_min_gap"])
        findings = []
        for t, pa in zip(tests, p_adj):
            t["p_holm"] = float(pa)
            if t["gap"] < min_gap or pa >= alpha:
                continue
            sig = min(1.0, -math.log10(max(pa, 1e-300)) / 3.0)
            col = ctx.table[t["attribute"]]
            in_group = col.notna().to_numpy() & (col.astype(str).to_numpy() == t["value"])
            rows = np.flatnonzero(in_group & (label == t["class"]) & ~correct)  # its errors
            findings.append(self.finding(
                severity=min(1.0, t["gap"] / 0.4) * (0.5 + 0.5 * sig),
                title=(f"'{t['class']}' with {t['attribute']}={t['value']}: accuracy "
                       f"{t['accuracy']:.0%} vs {t['rest_accuracy']:.0%} for the rest of the class"),
                class_=t["class"], group={"attribute": t["attribute"], "value": t["value"]},
                evidence={**t, "n_tests": len(tests)},
                examples=ctx.examples(rows, order=ctx.col("confidence")[rows]),
            ))
        return DetectorResult(findings=findings)
