"""spurious_background: a class whose correct predictions attend to the background."""

import numpy as np
import pytest

from biasscope.findings import Context, run_detector


def _scan(make_table, seed=0, low=("d",), n=30):
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d"]
    label = np.repeat(np.arange(4), n)
    inside = rng.uniform(0.65, 0.9, len(label))
    for c in low:
        k = classes.index(c)
        inside[label == k] = rng.uniform(0.1, 0.35, n)
    return make_table(classes, label, inside=inside, mask_frac=np.full(len(label), 0.3))


def test_the_low_class_is_found_and_no_other(make_table):
    t = _scan(make_table)
    res = run_detector(Context(table=t), "spurious_background")
    assert [f.class_ for f in res.findings] == ["d"]
    f = res.findings[0]
    assert f.scope == "class"
    assert f.evidence["drop"] > 0.4 and f.evidence["p_adjusted"] < 1e-6
    assert f.evidence["mean_lift"] < 1
    assert f.severity == pytest.approx(1.0)


def test_a_moderate_drop_gives_a_moderate_severity(make_table):
    rng = np.random.default_rng(3)
    label = np.repeat(np.arange(3), 40)
    inside = np.r_[rng.uniform(0.7, 0.8, 40), rng.uniform(0.7, 0.8, 40), rng.uniform(0.5, 0.6, 40)]
    t = make_table(["a", "b", "c"], label, inside=inside, mask_frac=np.full(120, 0.2))
    (f,) = run_detector(Context(table=t), "spurious_background").findings
    assert f.class_ == "c" and f.evidence["mean_lift"] > 1
    assert f.severity == pytest.approx(f.evidence["drop"] / 0.4)
    assert 0.4 < f.severity < 0.6


def test_misclassified_images_do_not_count(make_table):
    # Class d's *wrong* predictions attend to the background; its correct ones do not.
    t = _scan(make_table, low=())
    d = np.flatnonzero(t["label"] == "d")
    t.loc[d[:20], "inside_frac"] = 0.05
    t.loc[d[:20], "correct"] = False
    res = run_detector(Context(table=t), "spurious_background")
    assert res.findings == []


def test_single_class_uses_the_absolute_lift_test(make_table):
    t = make_table(["a"], np.zeros(20, int), inside=np.full(20, 0.2), mask_frac=np.full(20, 0.4))
    (f,) = run_detector(Context(table=t), "spurious_background").findings
    assert f.evidence["mean_lift"] == pytest.approx(0.5)
    assert f.severity == pytest.approx(1.0)  # 0.4 + 1.2 * (1 - 0.5)
    ok = make_table(["a"], np.zeros(20, int), inside=np.full(20, 0.8), mask_frac=np.full(20, 0.4))
    assert run_detector(Context(table=ok), "spurious_background").findings == []


def test_counterfactual_evidence_is_attached(make_table):
    t = _scan(make_table)
    cf = {"classes": {"d": {"only_bg_rate": 0.7, "bg_gap": 0.3}}}
    (f,) = run_detector(Context(table=t, counterfactuals=cf), "spurious_background").findings
    assert f.evidence["counterfactuals"] == cf["classes"]["d"]


def test_skipped_without_masks_or_enough_images(make_table):
    t = make_table(["a", "b"], np.array([0, 1] * 10))
    assert "no masks" in run_detector(Context(table=t), "spurious_background").skipped
    few = make_table(["a", "b"], np.array([0, 1] * 2), inside=np.full(4, 0.5))
    assert "no class has 5" in run_detector(Context(table=few), "spurious_background").skipped
