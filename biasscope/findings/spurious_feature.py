"""``spurious_feature``: a feature of the images that pulls other classes' predictions to class S.

Reads the attractor analysis (:mod:`biasscope.attractors`, ``ctx.attractors``) of the
counterfactual pass. Class S is flagged when

* the **attraction** -- the share of other classes' objects predicted S when pasted onto
  backgrounds that the model reads as S (Only-BG prediction S), minus the share on the other
  backgrounds, both over backgrounds of third-class images -- has a lower 95% CI bound of at
  least ``feature_min_attraction`` (0.15);
* the share on the featured backgrounds is at least ``feature_min_rate`` (0.2): a real pull,
  not a shift of a few per cent; and
* at least ``feature_min_backgrounds`` (20) background images are read as S, and as many are
  left to compare with (a bootstrap over fewer background images gives intervals too narrow
  to trust).

A clean model reads the pasted object whatever the background says, so both shares are close
whichever backgrounds happen to look like S; a model with a shortcut to S follows the
background. The test needs no knowledge of what the feature is (texture, mark, frame, colour):
the model's own reading of the empty background selects the images that carry it.

Severity ``min(1, attraction_lo / 0.25) * min(1, pulled_share / 0.05)``: a pull of 25 points
(lower bound) on other classes' objects is as strong as evidence gets, and it counts fully when
it affects at least 5% of them on the data's own backgrounds (``pulled_share``: the share of
backgrounds read as S times the pull there). Measured on the zoo and the built-in benchmark:
planted attractors pull 7.6-15% (the weakest, the benchmark's ``zero``, 7.6%), while the control
class of the benchmark, read into 5% of the backgrounds, pulls 2%. Evidence: the attraction figures with CIs, the Only-FG
baseline (how often other classes' objects alone are called S), the victims (per class, draws
and original images pulled to S), the most attracting attribute values (e.g.
``background=grass``), the background images that attract most (``examples``) and the mean
heatmap of S's predictions on images whose own background reads as S.
"""

from __future__ import annotations

import numpy as np

from biasscope.analysis import heatmap_geometry, normalise_cams

from .base import Context, Detector, DetectorResult, register


def passes(f: dict, o: dict) -> bool:
    """The rule above on one class's attractor figures (``o``: detector options)."""
    ci = f.get("attraction_ci")
    return (ci is not None and f.get("rate_in") is not None
            and ci[0] >= float(o["feature_min_attraction"])
            and f["rate_in"] >= float(o["feature_min_rate"])
            and f["n_featured_backgrounds"] >= int(o["feature_min_backgrounds"])
            and f.get("n_comparison_backgrounds", int(o["feature_min_backgrounds"]))
            >= int(o["feature_min_backgrounds"]))


def attracting_classes(ctx: Context) -> list:
    """The classes this detector flags (for detectors that discount a shortcut's victims)."""
    att = ctx.attractors
    return [] if att is None else list(att.get("attractors", []))


@register
class SpuriousFeature(Detector):
    name = kind = "spurious_feature"
    scope = "class"
    description = ("Classes that a feature of the background pulls other classes' objects to "
                   "(attractor analysis of the background-swap tests).")

    def run(self, ctx: Context) -> DetectorResult:
        att = ctx.attractors
        if att is None:
            return DetectorResult.skip("counterfactual tests not run (no masks, or counterfactuals=False)")
        o = ctx.options
        row_of = ctx.row_of_index()
        findings = []
        for s, f in att["classes"].items():
            if s not in att.get("attractors", []):
                continue
            ci = f["attraction_ci"]
            # strength of the pull, weighted by how much of the data it affects (full from 5%
            # of the other classes' objects pulled on the data's own backgrounds)
            sev = float(min(1.0, ci[0] / 0.25) * min(1.0, (f.get("pulled_share") or 0.0) / 0.05))
            if sev <= 0.0:
                continue
            ev = {k: v for k, v in f.items() if k not in ("victim_index",)}
            ev["victims"] = dict(sorted(f["victims"].items(),
                                        key=lambda kv: -kv[1]["n_draws_to_class"]))
            rows = [row_of[i] for i in f["victim_index"] if i in row_of]
            where = self._where(ctx, rows, ev)
            ev["verdict_line"] = _line(s, f, where)
            findings.append(self.finding(
                severity=sev, title=_title(s, f), class_=s, evidence=ev,
                examples=(f["examples_victims"] + f["examples_backgrounds"])[: int(o["max_examples"])]))
        return DetectorResult(findings=findings)

    @staticmethod
    def _where(ctx: Context, rows, ev: dict) -> str | None:
        """Mean heatmap of the victims' predictions (into ``ev``) and, when it sits at one
        spot, where."""
        if ctx.heatmaps is None or len(rows) < 3:
            return None
        maps, zero = normalise_cams(np.asarray(ctx.heatmaps)[np.asarray(rows)])
        maps = maps[~zero]
        if not len(maps):
            return None
        mean = maps.mean(axis=0)
        ev["mean_heatmap"] = np.round(mean, 5).tolist()
        geo = {k: float(v[0]) for k, v in heatmap_geometry(mean[None]).items()}
        ev["heatmap_centroid"] = {"x": round(geo["cx"], 4), "y": round(geo["cy"], 4)}
        ev["heatmap_hot_area"] = round(geo["hot_area"], 4)
        if geo["hot_area"] <= float(ctx.options["cluster_hot_area"]):
            return _place(geo["cx"], geo["cy"])
        return None


def _place(x: float, y: float) -> str:
    v = "top" if y < 1 / 3 else "bottom" if y > 2 / 3 else "middle"
    h = "left" if x < 1 / 3 else "right" if x > 2 / 3 else "centre"
    return "the centre" if (v, h) == ("middle", "centre") else f"the {v}-{h}" if v != "middle" else f"the middle-{h}"


def _top_value(f: dict) -> str | None:
    for attr, rows in (f.get("per_attribute") or {}).items():
        vals = list(rows.items())
        if len(vals) >= 2 and vals[0][1]["rate"] >= 2 * max(vals[1][1]["rate"], 0.05):
            return f"{attr}={vals[0][0]}"
    return None


def _title(s: str, f: dict) -> str:
    return (f"backgrounds the model reads as '{s}' pull other classes to '{s}': {f['rate_in']:.0%} "
            f"of their objects pasted there are predicted '{s}' vs {f['rate_out']:.0%} elsewhere")


def _line(s: str, f: dict, where: str | None) -> str:
    what = "a feature of the background"
    top = _top_value(f)
    if where:
        what = f"something at {where} of the image"
    elif top:
        what = f"the background ({top})"
    victims = ", ".join(f"'{c}' {v['n_victims_original']}" for c, v in sorted(
        f["victims"].items(), key=lambda kv: -kv[1]["n_victims_original"]) if v["n_victims_original"])
    line = (f"'{s}' is predicted from {what}: {f['rate_in']:.0%} of other-class objects placed on "
            f"backgrounds carrying it are predicted '{s}' ({f['rate_out']:.0%} elsewhere)")
    if victims:
        line += f"; images it pulls to '{s}': {victims}"
    return line
