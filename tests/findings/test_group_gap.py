"""group_gap: (class, attribute value) groups with a significant accuracy gap."""

import numpy as np
import pytest

from biasscope.findings import Context, run_detector
from biasscope.findings.group_gap import holm, two_proportion_z


def test_two_proportion_z_and_holm():
    z, p = two_proportion_z(30, 50, 20, 50)  # 0.6 vs 0.4, pooled 0.5, se 0.1
    assert z == pytest.approx(2.0) and p == pytest.approx(0.0455, abs=1e-4)
    assert two_proportion_z(10, 10, 20, 20) == (0.0, 1.0)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5])


def _scan(make_table, n=40):
    # Class a: 95% right on grass, 40% on sand. Class b: 80% on both.
    label = np.r_[np.zeros(2 * n, int), np.ones(2 * n, int)]
    bg = np.array((["grass"] * n + ["sand"] * n) * 2, dtype=object)
    ok = np.r_[np.arange(n) < 0.95 * n, np.arange(n) < 0.4 * n, np.arange(n) < 0.8 * n,
               np.arange(n) < 0.8 * n]
    pred = np.where(ok, label, 1 - label)
    return make_table(["a", "b"], label, pred, background=bg)


def test_finds_the_bad_group_only(make_table):
    t = _scan(make_table)
    res = run_detector(Context(table=t), "group_gap")
    (f,) = res.findings
    assert f.class_ == "a" and f.group == {"attribute": "background", "value": "sand"}
    assert f.scope == "group"
    assert f.evidence["accuracy"] == pytest.approx(0.4)
    assert f.evidence["rest_accuracy"] == pytest.approx(0.95)
    assert f.evidence["p_holm"] < 0.001 and f.evidence["n_tests"] == 4
    assert f.evidence["attribute_worst_group_acc"] == pytest.approx(0.4)
    assert f.severity == pytest.approx(1.0)  # gap 0.55 > 0.4 and p < 0.001
    assert all(p.startswith("a/") for p in f.examples) and f.examples


def test_small_gaps_small_groups_and_missing_values_are_ignored(make_table):
    t = _scan(make_table, n=8)  # groups of 8 < group_min_n = 10
    res = run_detector(Context(table=t), "group_gap")
    assert res.skipped and "10 images" in res.skipped
    # Without values for class a, only class b's equal groups are left: nothing to report.
    t = _scan(make_table)
    t.loc[t["label"] == "a", "background"] = None
    res = run_detector(Context(table=t), "group_gap")
    assert res.skipped is None and res.findings == []


def test_not_significant_is_not_a_finding(make_table):
    # 12 images per group: 10/12 vs 7/12 is a 25-point gap but p ~ 0.18.
    label = np.zeros(24, int)
    ok = np.r_[np.arange(12) < 10, np.arange(12) < 7]
    t = make_table(["a", "b"], label, np.where(ok, 0, 1),
                   site=np.array(["x"] * 12 + ["y"] * 12, dtype=object))
    assert run_detector(Context(table=t), "group_gap").findings == []


def test_skipped_without_attributes(make_table):
    t = make_table(["a", "b"], np.array([0, 1] * 20))
    assert run_detector(Context(table=t), "group_gap").skipped == "no attributes in the manifest"
