"""background_reliance (counterfactual background tests) and the backing of spurious_background."""

import json

import numpy as np
import pytest

from biasscope.findings import Context, run_detector, run_detectors
from biasscope.findings.background_reliance import gap_counts

CLASSES = ["a", "b", "c", "d"]


def figures(*, n=50, bg_gap=0.0, gap_ci=(-0.05, 0.05), only_bg=0.25, only_bg_ci=(0.15, 0.35),
            only_bg_base=0.25, only_bg_excess_ci=(-0.1, 0.1), transplant=0.1,
            transplant_ci=(0.05, 0.15), transplant_base=0.1, transplant_excess_ci=(-0.05, 0.05),
            flip=0.05, flip_ci=(0.0, 0.1), orig_acc=0.9):
    return {"n": n, "chance": 0.25, "only_bg_rate": only_bg, "only_bg_ci": list(only_bg_ci),
            "only_bg_base": only_bg_base, "only_bg_excess": only_bg - only_bg_base,
            "only_bg_excess_ci": list(only_bg_excess_ci), "n_mixed": n, "orig_acc": orig_acc,
            "mixed_rand_acc": orig_acc - bg_gap, "bg_gap": bg_gap, "bg_gap_ci": list(gap_ci),
            "n_transplant": 3 * n, "transplant_rate": transplant, "transplant_ci": list(transplant_ci),
            "transplant_base": transplant_base, "transplant_excess_ci": list(transplant_excess_ci),
            "n_correct": int(n * orig_acc), "flip_rate": flip, "flip_ci": list(flip_ci)}


def counterfactuals(classes: dict, per_image=None) -> dict:
    out = {"classes": classes, "n_images": 200, "n_with_mask": 200, "seed": 0, "n_boot": 1000,
           "method": {}, "class_names": {str(i): c for i, c in enumerate(CLASSES)}}
    if per_image is not None:
        out["per_image"] = per_image
    return out


@pytest.fixture
def ctx(make_table):
    def build(cf, inside=None, **kw):
        label = np.repeat(np.arange(4), 50)
        t = make_table(CLASSES, label, inside=inside, mask_frac=np.full(200, 0.3))
        return Context(table=t, counterfactuals=cf, **kw)
    return build


def _per_image():
    """Class a: 10 correct images, 4 of them flipped on Mixed-Rand (2 draws each)."""
    label = np.array([0] * 10 + [1] * 10)
    mixed = np.tile(label[:, None], (1, 2))
    mixed[[1, 3, 5], 0] = 2       # one draw of three images flipped
    mixed[7, :] = 3               # both draws of image 7 flipped: listed first
    return {"index": list(range(20)), "path": [f"images/x/{i:03d}.png" for i in range(20)],
            "label_idx": label.tolist(), "orig_pred": label.tolist(),
            "only_bg_pred": [3] * 20, "mixed_pred": mixed[:, 0].tolist(),
            "bg_source_index": [0] * 20, "pair_tier": [2] * 20,
            "mixed_pred_all": mixed.tolist(), "bg_source_index_all": [[0, 0]] * 20,
            "pair_tier_all": [[2, 2]] * 20}


def test_a_significant_gap_is_flagged_with_its_figures(ctx):
    cf = counterfactuals({"a": figures(bg_gap=0.3, gap_ci=(0.2, 0.4)), "b": figures()},
                         per_image=_per_image())
    res = run_detector(ctx(cf), "background_reliance")
    (f,) = res.findings
    assert f.class_ == "a" and f.scope == "class" and f.kind == "background_reliance"
    assert f.severity == pytest.approx(0.6)  # 0.3 / 0.5
    assert f.evidence["bg_gap_ci"] == [0.2, 0.4] and f.evidence["criteria"] == ["bg_gap"]
    assert f.examples[0] == "images/x/007.png"
    assert sorted(f.examples) == [f"images/x/{i:03d}.png" for i in (1, 3, 5, 7)]
    json.dumps(f.to_dict(), allow_nan=False)


@pytest.mark.parametrize("kw, flagged", [
    (dict(bg_gap=0.3, gap_ci=(-0.01, 0.6)), False),          # not significant
    (dict(bg_gap=0.05, gap_ci=(0.01, 0.09)), False),         # significant but small
    (dict(bg_gap=0.12, gap_ci=(0.05, 0.19)), False),         # below background_min_gap
    (dict(bg_gap=0.16, gap_ci=(0.05, 0.27)), True),
    (dict(bg_gap=0.05, gap_ci=(0.01, 0.09), flip=0.3, flip_ci=(0.22, 0.4)), True),  # flips back it
    (dict(flip=0.3, flip_ci=(0.22, 0.4)), True),             # flips alone
    (dict(flip=0.25, flip_ci=(0.15, 0.35)), False),
    (dict(only_bg=0.6, only_bg_ci=(0.5, 0.7), only_bg_base=0.1, only_bg_excess_ci=(0.4, 0.6)), True),
    (dict(only_bg=0.4, only_bg_ci=(0.3, 0.5), only_bg_base=0.1, only_bg_excess_ci=(0.2, 0.4)), False),
    # a default answer on empty images: high Only-BG rate for every class's backgrounds
    (dict(only_bg=0.9, only_bg_ci=(0.85, 0.95), only_bg_base=0.9, only_bg_excess_ci=(-0.05, 0.05)), False),
    (dict(transplant=0.5, transplant_ci=(0.4, 0.6), transplant_base=0.1,
          transplant_excess_ci=(0.3, 0.5)), True),
    (dict(transplant=0.5, transplant_ci=(0.4, 0.6), transplant_base=0.5,
          transplant_excess_ci=(-0.1, 0.1)), False),
])
def test_criteria(ctx, kw, flagged):
    res = run_detector(ctx(counterfactuals({"a": figures(**kw)})), "background_reliance")
    assert [f.class_ for f in res.findings] == (["a"] if flagged else [])
    for f in res.findings:
        assert 0.0 <= f.severity <= 1.0


def test_severity_is_the_largest_criterion_and_stays_in_the_unit_interval(ctx):
    big = figures(bg_gap=0.9, gap_ci=(0.8, 1.0), flip=1.0, flip_ci=(0.9, 1.0), only_bg=1.0,
                  only_bg_ci=(1.0, 1.0), only_bg_base=0.0, only_bg_excess_ci=(1.0, 1.0))
    small = figures(flip=0.3, flip_ci=(0.21, 0.4))
    res = run_detector(ctx(counterfactuals({"a": big, "b": small})), "background_reliance")
    sev = {f.class_: f.severity for f in res.findings}
    assert sev["a"] == 1.0 and sev["b"] == pytest.approx(0.6)  # flips: 0.3 / 0.5
    assert set(res.findings[0].evidence["criteria"]) == {"bg_gap", "flips", "only_bg"}


def test_small_classes_are_not_judged(ctx):
    res = run_detector(ctx(counterfactuals({"a": figures(n=3, bg_gap=0.5, gap_ci=(0.3, 0.7))})),
                       "background_reliance")
    assert res.skipped and "no class has 5" in res.skipped


@pytest.mark.parametrize("cf, why", [
    (None, "not run"),
    ({"skipped": "no masks"}, "no masks"),
    ({"classes": {}}, "not run"),
])
def test_skipped_without_counterfactuals(ctx, cf, why):
    res = run_detector(ctx(cf), "background_reliance")
    assert res.skipped and why in res.skipped and res.findings == []
    _, status, _ = run_detectors(ctx(cf), ["background_reliance"])
    assert status["background_reliance"]["status"] == "skipped"


def test_gap_counts():
    assert gap_counts(figures(bg_gap=0.1, gap_ci=(0.01, 0.2)), 0.1, 0.2)
    assert not gap_counts(figures(bg_gap=0.1, gap_ci=(0.0, 0.2)), 0.1, 0.2)
    assert not gap_counts(figures(bg_gap=0.09, gap_ci=(0.01, 0.2)), 0.1, 0.2)
    assert gap_counts(figures(bg_gap=0.09, gap_ci=(0.01, 0.2), flip_ci=(0.2, 0.3)), 0.1, 0.2)
    assert not gap_counts(None, 0.1, 0.2)
    assert not gap_counts({"bg_gap": None, "bg_gap_ci": None}, 0.1, 0.2)


# --- spurious_background backed by the counterfactual tests ------------------------------------


def _inside(low=(), borderline=()):
    """inside_frac per image: 0.6..0.7 for most classes; much lower for ``low`` classes, a bit
    lower (not significant on its own) for ``borderline`` ones."""
    rng = np.random.default_rng(0)
    inside = rng.uniform(0.6, 0.7, 200)
    for c in low:
        inside[CLASSES.index(c) * 50:(CLASSES.index(c) + 1) * 50] = rng.uniform(0.1, 0.3, 50)
    for c in borderline:
        inside[CLASSES.index(c) * 50:(CLASSES.index(c) + 1) * 50] = rng.uniform(0.55, 0.65, 50)
    return inside


def test_a_significant_gap_backs_a_borderline_attention_signal(ctx):
    gap = figures(bg_gap=0.25, gap_ci=(0.15, 0.35))
    without = run_detector(ctx(None, inside=_inside(borderline="b")), "spurious_background")
    assert without.findings == []  # attention alone: borderline, not reported
    res = run_detector(ctx(counterfactuals({"b": gap, "c": figures()}), inside=_inside(borderline="b")),
                       "spurious_background")
    (f,) = res.findings
    assert f.class_ == "b" and f.evidence["backed_by_counterfactuals"] is True
    assert f.evidence["counterfactuals"] == gap
    assert f.evidence["attention_severity"] == 0.0 and 0 < f.evidence["drop"] < 0.15
    partial = f.evidence["drop"] / 0.4
    assert f.severity == pytest.approx(1 - (1 - 0.5) * (1 - partial))
    assert 0.5 < f.severity < 1.0


def test_a_significant_gap_alone_is_reported_at_the_gap_severity(ctx):
    inside = _inside()
    inside[:50] += 0.2  # attention on class a's objects above the others': no attention signal
    res = run_detector(ctx(counterfactuals({"a": figures(bg_gap=0.2, gap_ci=(0.1, 0.3))}),
                           inside=inside), "spurious_background")
    (f,) = res.findings
    assert f.class_ == "a" and f.severity == pytest.approx(0.4)


def test_no_gap_and_no_attention_signal_is_not_reported(ctx):
    cf = counterfactuals({c: figures() for c in CLASSES})
    assert run_detector(ctx(cf, inside=_inside(borderline="b")), "spurious_background").findings == []
    # a gap that does not count (CI includes 0) does not back anything either
    cf = counterfactuals({"b": figures(bg_gap=0.3, gap_ci=(-0.02, 0.6))})
    assert run_detector(ctx(cf, inside=_inside(borderline="b")), "spurious_background").findings == []


def test_attention_findings_keep_their_severity_and_gain_the_evidence(ctx):
    gap = figures(bg_gap=0.1, gap_ci=(0.05, 0.15))
    plain = run_detector(ctx(None, inside=_inside(low="d")), "spurious_background").findings
    backed = run_detector(ctx(counterfactuals({"d": gap}), inside=_inside(low="d")),
                          "spurious_background").findings
    assert [f.class_ for f in plain] == [f.class_ for f in backed] == ["d"]
    assert backed[0].severity >= plain[0].severity
    assert backed[0].evidence["counterfactuals"] == gap
    assert "counterfactuals" not in plain[0].evidence
