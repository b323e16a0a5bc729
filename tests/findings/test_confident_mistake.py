"""confident_mistake: wrong predictions at or above the confidence threshold (0.9)."""

import numpy as np
import pytest

from biasscope.findings import Context, run_detector


def _table(make_table):
    label = np.zeros(20, int)
    pred = label.copy()
    pred[:4] = 1
    conf = np.full(20, 0.8)
    conf[:4] = [0.95, 0.9, 0.85, 0.5]  # wrong: two at/above 0.9, two below
    return make_table(["a", "b"], label, pred, confidence=conf)


def test_threshold_is_inclusive_and_default_0_9(make_table):
    t = _table(make_table)
    res = run_detector(Context(table=t), "confident_mistake")
    assert np.flatnonzero(res.flags).tolist() == [0, 1]
    (f,) = res.findings
    assert f.class_ == "a" and f.evidence["n_confident_wrong"] == 2
    # 2/20 = 10% of the class -> full rate weight, times mean confidence 0.925.
    assert f.severity == pytest.approx(0.925)
    assert f.examples[:2] == [t["path"][0], t["path"][1]]


def test_threshold_option(make_table):
    t = _table(make_table)
    res = run_detector(Context(table=t, options={"confident_threshold": 0.8}), "confident_mistake")
    assert np.flatnonzero(res.flags).tolist() == [0, 1, 2]


def test_correct_predictions_are_never_flagged(make_table):
    t = make_table(["a", "b"], np.array([0, 1] * 5), confidence=np.full(10, 0.99))
    res = run_detector(Context(table=t), "confident_mistake")
    assert not res.flags.any() and res.findings == []
