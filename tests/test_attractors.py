"""biasscope.attractors: the class a background feature pulls other classes' objects to.

Synthetic counterfactual passes (tests/shortcut_data.py): in the planted one, backgrounds
carrying a feature (half of the images of classes 1 and 2, read as class 0 on their own)
pull pasted objects of other classes to class 0 with probability 0.8, other backgrounds with
0.05; in the clean one every background gives 0.05. The true attraction is 0.75 and 0.
"""

import copy

import numpy as np
import pytest
from shortcut_data import (CLASSES, S, as_lists, cf_of, class_index, reference_attraction,
                           reference_flips, shortcut_per_image)

from biasscope.attractors import attractor_stats, explained_by_attractor

TRUE_IN, TRUE_OUT = 0.8, 0.05


def _stats(pi, truth=None, **kw):
    attrs = None
    if truth is not None:
        attrs = {"background": dict(zip(pi["index"], truth["background"].tolist()))}
    return attractor_stats(cf_of(pi), class_index(), attributes=attrs, **kw)


@pytest.fixture(scope="module")
def planted():
    return shortcut_per_image(pull=TRUE_IN, base=TRUE_OUT)


@pytest.fixture(scope="module")
def clean():
    return shortcut_per_image(pull=None, base=TRUE_OUT)


def test_planted_attraction_rates_and_ci(planted):
    pi, truth = planted
    res = _stats(pi, truth)
    f = res["classes"]["zero"]
    ref = reference_attraction(pi, S)
    # the figures are the documented definitions, counted draw by draw
    assert f["rate_in"] == pytest.approx(ref["rate_in"])
    assert f["rate_out"] == pytest.approx(ref["rate_out"])
    assert f["attraction"] == pytest.approx(ref["rate_in"] - ref["rate_out"])
    for k in ("n_draws", "n_draws_featured", "n_featured_backgrounds", "n_backgrounds"):
        assert f[k] == ref[k], k
    # ... and recover what was planted
    assert f["rate_in"] == pytest.approx(TRUE_IN, abs=0.07)
    assert f["rate_out"] == pytest.approx(TRUE_OUT, abs=0.03)
    lo, hi = f["attraction_ci"]
    assert lo <= f["attraction"] <= hi
    assert lo <= TRUE_IN - TRUE_OUT <= hi
    assert lo > 0.5
    assert f["rate_in_ci"][0] <= TRUE_IN <= f["rate_in_ci"][1]
    assert f["rate_out_ci"][0] <= TRUE_OUT <= f["rate_out_ci"][1]
    # the featured backgrounds are exactly the featured images of classes 1 and 2 that were
    # used as third-class backgrounds: at most all 80 of them, at least 20
    assert 20 <= f["n_featured_backgrounds"] <= int(truth["featured"].sum())
    assert f["fg_rate"] == 0.0  # objects alone are never read as 0
    assert f["output_index"] == S
    assert res["n_images"] == len(pi["index"])
    # no other class has an attraction: their backgrounds are read as themselves only
    for c in CLASSES[1:]:
        assert res["classes"][c]["attraction"] is None


def test_clean_model_has_no_attraction(clean):
    pi, truth = clean
    f = _stats(pi, truth)["classes"]["zero"]
    ref = reference_attraction(pi, S)
    assert f["rate_in"] == pytest.approx(ref["rate_in"])
    assert f["rate_out"] == pytest.approx(ref["rate_out"])
    assert f["n_featured_backgrounds"] >= 20  # the model still reads those backgrounds as 0
    lo, hi = f["attraction_ci"]
    assert lo <= 0.0 <= hi
    assert abs(f["attraction"]) < 0.1 and hi < 0.15
    assert f["n_victims_original"] == 0


def test_victims_per_class(planted):
    pi, truth = planted
    f = _stats(pi)["classes"]["zero"]
    ref = reference_attraction(pi, S)
    assert set(f["victims"]) == {"one", "two", "three"}  # never the attractor itself
    for c in (1, 2, 3):
        v = f["victims"][CLASSES[c]]
        assert [v["n_draws_to_class"], v["n_draws_featured"]] == ref["victim_draws"][c]
        planted_victims = int((truth["victim"] & (truth["label"] == c)).sum())
        assert v["n_victims_original"] == planted_victims
        assert v["n_draws_to_class"] / v["n_draws_featured"] == pytest.approx(TRUE_IN, abs=0.2)
    assert f["victims"]["three"]["n_victims_original"] == 0  # class 3 carries no feature
    assert f["n_victims_original"] == int(truth["victim"].sum()) > 0
    idx = np.asarray(pi["index"])
    assert sorted(f["victim_index"]) == sorted(idx[truth["victim"]].tolist())
    assert set(f["examples_victims"]) <= set(np.asarray(pi["path"])[truth["victim"]].tolist())
    # the most attracting backgrounds are featured ones
    assert set(f["examples_backgrounds"]) <= set(np.asarray(pi["path"])[truth["featured"]].tolist())
    # originals: other classes' images with a background read as 0 are often predicted 0
    assert f["orig_rate_featured"] == pytest.approx(truth["victim"].sum() / truth["featured"].sum())
    assert f["orig_rate_plain"] == 0.0
    # a class-3 image predicted 0 on its own plain background is a mistake, not a victim
    p = copy.deepcopy(pi)
    orig = np.asarray(p["orig_pred"])
    orig[np.flatnonzero(np.asarray(p["label_idx"]) == 3)[:2]] = S
    p["orig_pred"] = orig.tolist()
    g = _stats(p)["classes"]["zero"]
    assert g["victims"]["three"]["n_victims_original"] == 0
    assert g["n_victims_original"] == f["n_victims_original"]
    assert g["orig_rate_plain"] == pytest.approx(2 / int((~truth["featured"] & (truth["label"] != S)).sum()))


def test_objects_already_read_as_the_class_alone_are_left_out(planted):
    pi, _ = planted
    pi = copy.deepcopy(pi)
    lab = np.asarray(pi["label_idx"])
    shape_s = np.flatnonzero(lab == 3)[:15]  # class-3 objects that alone look like 0
    fg = np.asarray(pi["only_fg_pred"])
    fg[shape_s] = S
    pi["only_fg_pred"] = fg.tolist()

    def with_mixed(value):
        p = copy.deepcopy(pi)
        m = np.asarray(p["mixed_pred_all"])
        m[shape_s] = value
        p["mixed_pred_all"] = m.tolist()
        return p

    a = _stats(with_mixed(S))["classes"]["zero"]   # always predicted 0 ...
    b = _stats(with_mixed(3))["classes"]["zero"]   # ... or never: no difference
    assert a == b
    assert a["n_draws"] == reference_attraction(with_mixed(S), S)["n_draws"]
    assert a["fg_rate"] == pytest.approx(15 / int((lab != S).sum()))
    # counter-check: with their Only-FG prediction their own, the same draws do count
    p = with_mixed(S)
    p["only_fg_pred"] = lab.tolist()
    c = _stats(p)["classes"]["zero"]
    assert c["n_draws"] > a["n_draws"]
    assert c["rate_out"] > a["rate_out"]


def test_backgrounds_of_the_class_or_of_the_objects_own_class_are_left_out(planted):
    pi, _ = planted
    pos = {d: k for k, d in enumerate(pi["index"])}
    lab = np.asarray(pi["label_idx"])
    src_lab = lab[np.vectorize(pos.get)(np.asarray(pi["bg_source_index_all"]))]
    excluded = (src_lab == S) | (src_lab == lab[:, None])
    assert excluded.sum() > 100  # the test means something

    def with_mixed(value):
        p = copy.deepcopy(pi)
        m = np.asarray(p["mixed_pred_all"])
        m[excluded] = value if value is not None else np.broadcast_to(lab[:, None], m.shape)[excluded]
        p["mixed_pred_all"] = m.tolist()
        return p

    a = _stats(with_mixed(S))["classes"]["zero"]     # every excluded draw predicted 0 ...
    b = _stats(with_mixed(None))["classes"]["zero"]  # ... or none of them
    assert a == b
    assert a["n_draws"] == int((~excluded & (lab != S)[:, None]).sum())
    # draws with no prediction (-1) or a background outside the pass are left out as well
    p = copy.deepcopy(pi)
    m, srcs = np.asarray(p["mixed_pred_all"]), np.asarray(p["bg_source_index_all"])
    keep = ~excluded & (lab != S)[:, None]
    rows, cols = np.nonzero(keep)
    m[rows[:10], cols[:10]] = -1
    srcs[rows[10:20], cols[10:20]] = 7  # not a dataset index of the pass
    p["mixed_pred_all"], p["bg_source_index_all"] = m.tolist(), srcs.tolist()
    assert _stats(p)["classes"]["zero"]["n_draws"] == a["n_draws"] - 20


def test_per_attribute_rates_put_the_featured_value_on_top(planted, clean):
    pi, truth = planted
    rows = _stats(pi, truth)["classes"]["zero"]["per_attribute"]["background"]
    assert list(rows)[0] == "grass"
    assert set(rows) == {"grass", "sand", "snow"}
    assert rows["grass"]["rate"] == pytest.approx(_stats(pi)["classes"]["zero"]["rate_in"])
    assert rows["grass"]["rate"] > 0.6 and rows["sand"]["rate"] < 0.15 and rows["snow"]["rate"] < 0.15
    ref = reference_attraction(pi, S)
    assert sum(r["n_draws"] for r in rows.values()) == ref["n_draws"]
    assert rows["grass"]["n_draws"] == ref["n_draws_featured"]
    # clean: no value stands out
    pi, truth = clean
    rows = _stats(pi, truth)["classes"]["zero"]["per_attribute"]["background"]
    assert max(r["rate"] for r in rows.values()) < 0.15


def test_deterministic_in_seed(planted):
    pi, truth = planted
    a, b = _stats(pi, truth, seed=3), _stats(pi, truth, seed=3)
    assert a == b
    c = _stats(pi, truth, seed=4)
    fa, fc = a["classes"]["zero"], c["classes"]["zero"]
    assert fa["rate_in"] == fc["rate_in"] and fa["attraction"] == fc["attraction"]
    assert fa["attraction_ci"] != fc["attraction_ci"]  # only the bootstrap depends on the seed


def test_explained_by_attractor(planted):
    pi, truth = planted
    pi = copy.deepcopy(pi)
    lab = np.asarray(pi["label_idx"])
    orig, ob = np.asarray(pi["orig_pred"]), np.asarray(pi["only_bg_pred"])
    idx = np.asarray(pi["index"])
    zero = np.flatnonzero(lab == S)
    three = np.flatnonzero(lab == 3)
    # class-0 images missed while their background is not read as 0 ("0 without its feature")
    own_miss = zero[:4]
    orig[own_miss], ob[own_miss] = 1, 1
    # a class-0 image missed although its background reads as 0: not explained either way
    orig[zero[4]] = 2
    # a class-3 image predicted 0 on a background not read as 0: a plain mistake
    orig[three[0]] = S
    # a class-3 image predicted 1 on a background read as 1: 1 is no attractor here
    orig[three[1]], ob[three[1]] = 1, 1
    pi["orig_pred"], pi["only_bg_pred"] = orig.tolist(), ob.tolist()

    res = explained_by_attractor(cf_of(pi), {"zero": S})
    expected = {int(i): "zero" for i in idx[truth["victim"]]}
    assert res["images"] == expected
    res_own = explained_by_attractor(cf_of(pi), {"zero": S}, own=["zero"])
    assert res_own["images"] == {**expected, **{int(i): "zero" for i in idx[own_miss]}}
    assert int(idx[zero[4]]) not in res_own["images"]
    assert int(idx[three[0]]) not in res_own["images"]
    # flips per class, counted draw by draw
    assert res["flips"] == reference_flips(pi, {S})
    assert res["flips"][S]["n_flips"] == 0  # class-0 objects never leave 0
    f3 = res["flips"][3]
    assert f3["n_explained"] / f3["n_flips"] > 0.7  # most flips: to 0 on featured backgrounds
    # with no attractor, nothing is explained
    none = explained_by_attractor(cf_of(pi), {})
    assert none["images"] == {} and all(v["n_explained"] == 0 for v in none["flips"].values())


def test_single_draw_layout_is_read_too(planted):
    pi, _ = planted
    one = {k: v for k, v in pi.items() if k not in ("mixed_pred_all", "bg_source_index_all", "pair_tier_all")}
    one["mixed_pred"] = [m[0] for m in pi["mixed_pred_all"]]
    one["bg_source_index"] = [s[0] for s in pi["bg_source_index_all"]]
    first = dict(pi, mixed_pred_all=[[m[0]] for m in pi["mixed_pred_all"]],
                 bg_source_index_all=[[s[0]] for s in pi["bg_source_index_all"]])
    assert _stats(one) == _stats(first)
    assert _stats(as_lists(one))["classes"]["zero"]["n_draws"] > 0


@pytest.mark.parametrize("cf", [None, {"skipped": "no masks"}, {"per_image": {}},
                                {"per_image": {"index": []}}])
def test_none_without_counterfactuals(cf):
    assert attractor_stats(cf, class_index()) is None
    assert explained_by_attractor(cf, {"zero": 0}) is None


def test_rates_of_the_originals_are_taken_on_the_sample_only(planted):
    """Outside the stratified sample only mistakes carry an Only-BG prediction (the scan makes
    none for the others): those rows must not bias the originals' rates, while the victims (all
    mistakes) are still counted."""
    pi, _ = planted
    full = _stats(pi)["classes"]["zero"]
    n = len(pi["index"])
    cut = copy.deepcopy(pi)
    ob = np.asarray(cut["only_bg_pred"]).copy()
    orig, label = np.asarray(cut["orig_pred"]), np.asarray(cut["label_idx"])
    out = np.arange(n) % 2 == 1  # every other image left out of the sample
    ob[out & (orig == label)] = -1  # ... and without an Only-BG image unless a mistake
    cut["only_bg_pred"] = ob.tolist()
    cut["in_sample"] = (~out).tolist()
    # draws only from the sample (sources in it)
    f = _stats(cut)["classes"]["zero"]
    other, s = label != S, S
    smp = other & ~out
    want_in = np.mean(orig[smp & (ob == s)] == s)
    want_out = np.mean(orig[smp & (ob != s) & (ob >= 0)] == s)
    assert f["orig_rate_featured"] == pytest.approx(want_in)
    assert f["orig_rate_plain"] == pytest.approx(want_out)
    assert f["n_other"] == int(smp.sum())
    # a rate over every row with an Only-BG image would count the mistakes twice as often
    biased = np.mean(orig[other & (ob == s)] == s)
    assert abs(biased - f["orig_rate_featured"]) > 0.05
    assert f["n_victims_original"] == full["n_victims_original"]  # victims are mistakes: all kept
