"""off_object_attention: inside_frac < 0.5 and lift < 1, per image; skipped without masks."""

import numpy as np
import pytest

from biasscope.findings import Context, run_detector


def test_flags_need_both_low_inside_frac_and_lift_below_one(make_table):
    inside = np.array([0.1, 0.4, 0.45, 0.6, np.nan, 0.2])
    mask_frac = np.array([0.3, 0.3, 0.6, 0.9, 0.3, 0.5])  # lift: 0.33, 1.33, 0.75, 0.67, -, 0.4
    pred = np.array([0, 0, 0, 0, 0, 1])
    label = np.array([0, 0, 0, 0, 0, 0])
    t = make_table(["a", "b"], label, pred, inside=inside, mask_frac=mask_frac)
    res = run_detector(Context(table=t), "off_object_attention")
    # Row 1 is off the object by inside_frac, but a small object: lift > 1 -> not flagged.
    # Row 3 has lift < 1 but most mass on the object -> not flagged. Row 4 has no mask.
    assert res.flags.tolist() == [True, False, True, False, False, True]
    np.testing.assert_allclose(res.scores[[0, 1, 2, 3, 5]], 1 - inside[[0, 1, 2, 3, 5]])
    assert np.isnan(res.scores[4])
    by_class = {f.class_: f for f in res.findings}  # by *predicted* class
    assert by_class["a"].evidence["n_with_mask"] == 4 and by_class["a"].evidence["n_off_object"] == 2
    assert by_class["a"].severity == pytest.approx(1.0)  # rate 0.5 -> full
    assert by_class["b"].evidence["n_off_object_correct"] == 0
    # Correct-but-off-object predictions are listed first.
    assert by_class["a"].examples[0] == t["path"][0]


def test_thresholds_are_options(make_table):
    t = make_table(["a"], np.zeros(3, int), inside=np.array([0.1, 0.55, 0.7]),
                   mask_frac=np.array([0.8, 0.8, 0.8]))
    res = run_detector(Context(table=t, options={"off_object_inside": 0.6}), "off_object_attention")
    assert res.flags.tolist() == [True, True, False]


def test_skipped_without_masks(make_table):
    t = make_table(["a", "b"], np.array([0, 1, 0]))
    res = run_detector(Context(table=t), "off_object_attention")
    assert res.skipped == "no masks: inside_frac is missing for every image"
    assert res.flags is None and res.findings == []
