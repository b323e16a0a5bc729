"""misclassified: per-image flags for wrong predictions, one finding per labelled class with errors."""

import numpy as np
import pytest

from biasscope.findings import Context, run_detector


def test_flags_and_one_finding_per_class_with_errors(make_table):
    classes = ["a", "b", "c"]
    label = np.repeat([0, 1, 2], 10)
    pred = label.copy()
    pred[[0, 1]] = 1            # a: 2 of 10 wrong
    pred[20:25] = [0, 0, 1, 1, 0]  # c: 5 of 10 wrong
    conf = np.linspace(0.5, 0.99, 30)
    t = make_table(classes, label, pred, confidence=conf)
    res = run_detector(Context(table=t), "misclassified")
    np.testing.assert_array_equal(res.flags, label != pred)
    by_class = {f.class_: f for f in res.findings}
    assert set(by_class) == {"a", "c"}
    assert by_class["a"].severity == pytest.approx(0.4)  # 2 * 20% error rate
    assert by_class["c"].severity == pytest.approx(1.0)  # 50% or more is as bad as it gets
    assert by_class["c"].evidence["confused_with"] == {"a": 3, "b": 2}
    assert by_class["a"].scope == "class" and by_class["a"].kind == "misclassified"
    # Most confident error first.
    assert by_class["c"].examples[0] == t["path"][24]


def test_no_errors_no_findings(make_table):
    t = make_table(["a", "b"], np.array([0, 1, 0, 1]))
    res = run_detector(Context(table=t), "misclassified")
    assert res.findings == [] and not res.flags.any()
