"""label_issue, model view: a shortcut's victims are not label errors.

The planted pass (tests/shortcut_data.py): class 'zero' is an attractor; featured images of
'one' and 'two' (their background read as 'zero') are predicted 'zero' with confidence 0.95,
above class zero's self-confidence threshold (0.8), so confident learning on the model's
probabilities calls them mislabelled. A few images labelled 'three' are genuine label errors:
their object alone is read as 'zero' and their background is not.
"""

import copy

import numpy as np
import pytest
from shortcut_data import CLASSES, cf_of, shortcut_per_image

from biasscope.findings import Context, run_detector
from biasscope.findings.spurious_feature import attracting_classes


@pytest.fixture(scope="module")
def world():
    pi, truth = shortcut_per_image(pull=0.8)
    pi = copy.deepcopy(pi)
    lab = np.asarray(pi["label_idx"])
    wrong_label = np.flatnonzero(lab == 3)[:6]  # objects of class zero labelled three
    for key in ("orig_pred", "only_fg_pred"):
        v = np.asarray(pi[key])
        v[wrong_label] = 0
        pi[key] = v.tolist()
    m = np.asarray(pi["mixed_pred_all"])
    m[wrong_label] = 0
    pi["mixed_pred_all"] = m.tolist()
    return pi, truth, wrong_label


def _ctx(make_table, world, *, cf=True, **kw):
    pi = world[0]
    pred = np.asarray(pi["orig_pred"])
    conf = np.where(pred != np.asarray(pi["label_idx"]), 0.95, 0.8)
    t = make_table(CLASSES, np.asarray(pi["label_idx"]), pred, confidence=conf)
    t["index"], t["path"] = pi["index"], pi["path"]
    return Context(table=t, counterfactuals=cf_of(pi) if cf else None, **kw)


def test_victims_are_flagged_without_the_counterfactuals(make_table, world):
    _, truth, wrong_label = world
    res = run_detector(_ctx(make_table, world, cf=False), "label_issue")
    assert truth["victim"].sum() >= 20
    assert res.flags[truth["victim"]].all()  # the model view alone blames the labels
    assert res.flags[wrong_label].all()
    assert res.flags.sum() == truth["victim"].sum() + wrong_label.size


def test_victims_of_an_attractor_are_not_flagged(make_table, world):
    _, truth, wrong_label = world
    ctx = _ctx(make_table, world)
    assert attracting_classes(ctx) == ["zero"]  # the attraction passes spurious_feature's rule
    res = run_detector(ctx, "label_issue")
    assert not res.flags[truth["victim"]].any()
    assert res.flags[wrong_label].all()  # genuine label errors are still found
    assert res.flags.sum() == wrong_label.size
    (f,) = res.findings
    assert (f.evidence["given"], f.evidence["suggested"], f.evidence["n"]) == ("three", "zero", 6)
    assert f.evidence["n_explained_by_shortcut_excluded"] == int(truth["victim"].sum())
    # the scores are the model's self-confidence either way
    np.testing.assert_allclose(res.scores, 1 - ctx.table["label_prob"].to_numpy())


def test_victims_are_flagged_again_when_the_class_is_no_attractor(make_table, world):
    _, truth, _ = world
    ctx = _ctx(make_table, world, options={"feature_min_attraction": 0.99})
    assert attracting_classes(ctx) == []
    res = run_detector(ctx, "label_issue")
    assert res.flags[truth["victim"]].all()
