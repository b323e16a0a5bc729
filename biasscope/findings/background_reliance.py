"""``background_reliance``: classes whose predictions follow the background, by counterfactuals.

Reads the Backgrounds-Challenge-style tests of :func:`biasscope.counterfactuals.run_counterfactuals`
(Xiao et al., ICLR 2021) from ``ctx.counterfactuals`` (``{"classes": {class: figures}, ...}``).
A class with at least ``min_class_images`` tested images is flagged when any of these holds
(CI = the bootstrap 95% interval computed with the figure):

* **BG-gap** (:func:`gap_counts`): accuracy drops when the class's objects are pasted onto
  other backgrounds (Mixed-Rand): the gap's CI lies above 0, and the gap is at least
  ``background_min_gap`` (0.15) or at least ``background_min_flip`` (0.2, lower CI bound) of the
  class's correct predictions flip. The second arm matters on validation sets balanced over
  backgrounds, where the gap is diluted by the share of images on the class's own background.
  Severity ``min(1, bg_gap / 0.5)``.
* **Flips**: at least ``background_min_flip`` of the class's correct predictions do not survive
  moving the object onto another background (lower CI bound). Severity ``min(1, flip_rate / 0.5)``.
* **Only-BG**: with the object removed, the class is still predicted: the lower CI bound of the
  Only-BG rate exceeds chance (1 / number of classes) by ``background_only_bg_margin`` (0.1)
  **and** the rate exceeds the rate at which other classes' Only-BG images are read as this
  class (excess CI above 0), so that a model's default answer on empty images is not taken for
  a shortcut. Severity ``(rate - chance) / (1 - chance)``.
* **Transplant**: other classes' objects on this class's backgrounds are predicted as this
  class more often than chance and more often than on third classes' backgrounds (lower CI
  bounds). Severity as for Only-BG.

The severity is the largest of the criteria that hold. Examples: the class's correctly
classified images whose Mixed-Rand version was not, most often flipped first.
"""

from __future__ import annotations

import numpy as np

from .base import Context, Detector, DetectorResult, register


def counterfactual_classes(ctx: Context) -> tuple[dict | None, str | None]:
    """``(per-class figures, None)`` or ``(None, why the tests are unavailable)``."""
    cf = ctx.counterfactuals
    if not cf:
        return None, "counterfactual tests not run (no masks, or counterfactuals=False)"
    if cf.get("skipped"):
        return None, f"counterfactual tests not run ({cf['skipped']})"
    classes = cf.get("classes")
    if not isinstance(classes, dict) or not classes:
        return None, "counterfactual tests not run (no per-class results)"
    return classes, None


def _lo(ci) -> float | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and ci[0] is not None:
        return float(ci[0])
    return None


def gap_counts(figures: dict | None, min_gap: float, min_flip: float) -> bool:
    """The BG-gap test: CI above 0, and the gap at least ``min_gap`` or the flip rate's lower CI
    bound at least ``min_flip``."""
    if not figures or figures.get("bg_gap") is None:
        return False
    lo = _lo(figures.get("bg_gap_ci"))
    if lo is None or lo <= 0.0:
        return False
    flip_lo = _lo(figures.get("flip_ci"))
    return (float(figures["bg_gap"]) >= float(min_gap)
            or (flip_lo is not None and flip_lo >= float(min_flip)))


def _above(figures: dict, name: str, floor: float) -> bool:
    """The lower CI bound of ``name`` (``only_bg``, ``transplant``) above ``floor``, and that of
    its excess over the base rate above 0."""
    lo, ex = _lo(figures.get(f"{name}_ci")), _lo(figures.get(f"{name}_excess_ci"))
    return lo is not None and lo > floor and ex is not None and ex > 0.0


def _above_chance(rate, chance) -> float:
    return float(np.clip((float(rate) - chance) / max(1.0 - chance, 1e-9), 0.0, 1.0))


@register
class BackgroundReliance(Detector):
    name = kind = "background_reliance"
    scope = "class"
    description = ("Classes whose predictions change with the background: Only-BG, Mixed-Rand "
                   "(BG-gap) and background-transplant tests with bootstrap CIs.")

    def run(self, ctx: Context) -> DetectorResult:
        classes, why = counterfactual_classes(ctx)
        if classes is None:
            return DetectorResult.skip(why)
        o = ctx.options
        min_n, min_gap = int(o["min_class_images"]), float(o["background_min_gap"])
        margin, min_flip = float(o["background_only_bg_margin"]), float(o["background_min_flip"])
        if not any((f.get("n") or 0) >= min_n for f in classes.values()):
            return DetectorResult.skip(f"no class has {min_n} images with a counterfactual test")
        flipped = _flipped_examples(ctx.counterfactuals, ctx)
        findings = []
        for c, f in classes.items():
            if (f.get("n") or 0) < min_n:
                continue
            chance = float(f.get("chance") or 0.0)
            reasons, sev = [], 0.0
            if gap_counts(f, min_gap, min_flip):
                reasons.append("bg_gap")
                sev = max(sev, min(1.0, float(f["bg_gap"]) / 0.5))
            lo = _lo(f.get("flip_ci"))
            if lo is not None and lo >= min_flip:
                reasons.append("flips")
                sev = max(sev, min(1.0, float(f["flip_rate"]) / 0.5))
            if _above(f, "only_bg", chance + margin):
                reasons.append("only_bg")
                sev = max(sev, _above_chance(f["only_bg_rate"], chance))
            if _above(f, "transplant", chance):
                reasons.append("transplant")
                sev = max(sev, _above_chance(f["transplant_rate"], chance))
            if not reasons or sev <= 0.0:
                continue
            ev = {k: f.get(k) for k in (
                "n", "chance", "only_bg_rate", "only_bg_ci", "only_bg_base", "only_bg_excess_ci",
                "n_mixed", "orig_acc", "mixed_rand_acc", "bg_gap", "bg_gap_ci", "n_transplant",
                "transplant_rate", "transplant_ci", "transplant_base", "transplant_excess_ci",
                "n_correct", "flip_rate", "flip_ci")}
            ev["criteria"] = reasons
            findings.append(self.finding(
                severity=sev, title=_title(c, f, reasons), class_=c, evidence=ev,
                examples=flipped.get(c, [])[: int(o["max_examples"])]))
        return DetectorResult(findings=findings)


def _title(c: str, f: dict, reasons: list) -> str:
    if "bg_gap" in reasons:
        return (f"'{c}' depends on its background: accuracy {f['orig_acc']:.0%} -> "
                f"{f['mixed_rand_acc']:.0%} when its objects are moved onto other backgrounds")
    if "flips" in reasons:
        return (f"'{c}' depends on its background: {f['flip_rate']:.0%} of its correct predictions "
                "change when the object is moved onto another background")
    if "only_bg" in reasons:
        return (f"'{c}' is predicted from the background alone: {f['only_bg_rate']:.0%} of its "
                f"images with the object removed (chance {f['chance']:.0%})")
    return (f"backgrounds of '{c}' pull other classes' objects to '{c}': "
            f"{f['transplant_rate']:.0%} (chance {f['chance']:.0%})")


def _flipped_examples(cf: dict, ctx: Context) -> dict:
    """Class name -> paths of its correctly classified images whose Mixed-Rand version is not,
    most often flipped first."""
    pi = cf.get("per_image") or {}
    if not pi.get("index"):
        return {}
    label = np.asarray(pi["label_idx"], dtype=np.int64)
    orig = np.asarray(pi["orig_pred"], dtype=np.int64)
    if pi.get("mixed_pred_all") is not None:
        mixed = np.asarray(pi["mixed_pred_all"], dtype=np.int64).reshape(len(label), -1)
        tier = np.asarray(pi["pair_tier_all"], dtype=np.int64).reshape(len(label), -1)
    else:
        mixed = np.asarray(pi["mixed_pred"], dtype=np.int64)[:, None]
        tier = np.asarray(pi.get("pair_tier", np.full(len(label), 2)), dtype=np.int64)[:, None]
    good = tier == 2
    n_flip = (good & (mixed != label[:, None])).sum(axis=1)
    share = n_flip / np.maximum(good.sum(axis=1), 1)
    flipped = (orig == label) & (n_flip > 0)
    if "path" in pi:
        paths = np.asarray(pi["path"], dtype=object)
    else:
        paths = np.array([f"#{i}" for i in pi["index"]], dtype=object)
    names = {int(v): k for k, v in ctx.class_index.items()}
    names.update({int(k): v for k, v in (cf.get("class_names") or {}).items()})
    out = {}
    for ci in np.unique(label[flipped]):
        rows = np.flatnonzero(flipped & (label == ci))
        rows = rows[np.argsort(-share[rows], kind="stable")]
        out[names.get(int(ci), f"#{int(ci)}")] = [str(p) for p in paths[rows]]
    return out
