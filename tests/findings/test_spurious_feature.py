"""spurious_feature: the attractor analysis of the counterfactual pass as a finding.

Synthetic counterfactual passes (tests/shortcut_data.py): class 'zero' is planted as an
attractor (featured backgrounds pull other classes' objects to it), the clean control
ignores backgrounds.
"""

import json

import numpy as np
import pytest
from shortcut_data import CLASSES, cf_of, shortcut_per_image

from biasscope.findings import Context, run_detector, run_detectors


def scan_ctx(make_table, pi, truth, *, cf=True, **kw):
    """A context whose table is the pass's images (dataset index, path, original prediction)."""
    t = make_table(CLASSES, np.asarray(pi["label_idx"]), np.asarray(pi["orig_pred"]),
                   background=truth["background"])
    t["index"], t["path"] = pi["index"], pi["path"]
    return Context(table=t, counterfactuals=cf_of(pi) if cf else None, **kw)


@pytest.fixture(scope="module")
def planted():
    return shortcut_per_image(pull=0.8)


@pytest.mark.parametrize("pull", [0.8, 0.3])
def test_planted_attractor_is_one_finding_for_its_class(make_table, pull):
    pi, truth = shortcut_per_image(pull=pull)
    ctx = scan_ctx(make_table, pi, truth)
    res = run_detector(ctx, "spurious_feature")
    (f,) = res.findings
    assert f.class_ == "zero" and f.kind == "spurious_feature" and f.scope == "class"
    assert f.id == "spurious_feature/class=zero"
    fig = ctx.attractors["classes"]["zero"]
    lo = fig["attraction_ci"][0]
    assert f.severity == pytest.approx(min(1.0, lo / 0.25) * min(1.0, fig["pulled_share"] / 0.05))
    # the featured backgrounds' share times the pull there
    share = fig["n_draws_featured"] / (fig["n_draws"])
    assert fig["pulled_share"] == pytest.approx(share * fig["rate_in"])
    if pull == 0.3:  # a moderate pull: below full severity, still above the threshold
        assert 0.15 <= lo < 0.25 and f.severity < 1.0
    else:
        assert f.severity == 1.0
    ev = f.evidence
    assert ev["attraction_ci"] == fig["attraction_ci"] and ev["rate_in"] == fig["rate_in"]
    assert "victim_index" not in ev
    assert set(ev["victims"]) == {"one", "two", "three"}
    draws = [v["n_draws_to_class"] for v in ev["victims"].values()]
    assert draws == sorted(draws, reverse=True)  # most pulled class first
    assert ev["victims"]["one"]["n_victims_original"] == int((truth["victim"] & (truth["label"] == 1)).sum())
    assert "'zero'" in ev["verdict_line"]
    assert "background=grass" in ev["verdict_line"]  # the attracting attribute value is named
    assert "'one' " in ev["verdict_line"] and "'two' " in ev["verdict_line"]
    assert "'zero'" in f.title
    # examples: the victims first, then the most attracting backgrounds
    victims = set(np.asarray(pi["path"])[truth["victim"]].tolist())
    assert f.examples and f.examples[0] in victims and len(f.examples) <= 10
    json.dumps(f.to_dict(), allow_nan=False)


def test_clean_model_has_no_finding(make_table):
    pi, truth = shortcut_per_image(pull=None)
    res = run_detector(scan_ctx(make_table, pi, truth), "spurious_feature")
    assert res.skipped is None and res.findings == []


def test_the_mean_heatmap_of_the_victims_places_a_spot(make_table, make_blob, planted):
    pi, truth = planted
    heat = np.stack([make_blob(16, 1.0, 14.0, 0.6) for _ in pi["index"]])
    ctx = scan_ctx(make_table, pi, truth, heatmaps=heat)
    (f,) = run_detector(ctx, "spurious_feature").findings
    assert np.asarray(f.evidence["mean_heatmap"]).shape == (16, 16)
    assert "top-right" in f.evidence["verdict_line"]


@pytest.mark.parametrize("option", ["feature_min_attraction", "feature_min_rate",
                                    "feature_min_backgrounds"])
def test_each_threshold_can_suppress_the_finding(make_table, planted, option):
    pi, truth = planted
    fig = scan_ctx(make_table, pi, truth).attractors["classes"]["zero"]
    value = {"feature_min_attraction": fig["attraction_ci"][0], "feature_min_rate": fig["rate_in"],
             "feature_min_backgrounds": fig["n_featured_backgrounds"]}[option]
    at = run_detector(scan_ctx(make_table, pi, truth, options={option: value}), "spurious_feature")
    assert [f.class_ for f in at.findings] == ["zero"]  # the thresholds are inclusive
    above = value + (1 if option == "feature_min_backgrounds" else 1e-6)
    res = run_detector(scan_ctx(make_table, pi, truth, options={option: above}), "spurious_feature")
    assert res.skipped is None and res.findings == []


def test_defaults_are_the_documented_ones(make_table, planted):
    pi, truth = planted
    ctx = scan_ctx(make_table, pi, truth)
    assert (ctx.options["feature_min_attraction"], ctx.options["feature_min_rate"],
            ctx.options["feature_min_backgrounds"]) == (0.15, 0.2, 20)


@pytest.mark.parametrize("cf", [None, {"skipped": "no masks"}])
def test_skipped_without_counterfactuals(make_table, planted, cf):
    pi, truth = planted
    ctx = scan_ctx(make_table, pi, truth, cf=False)
    ctx.counterfactuals = cf
    res = run_detector(ctx, "spurious_feature")
    assert res.skipped and "counterfactual" in res.skipped and res.findings == []
    _, status, _ = run_detectors(ctx, ["spurious_feature"])
    assert status["spurious_feature"]["status"] == "skipped" and status["spurious_feature"]["reason"]


def test_a_pull_on_few_backgrounds_is_less_severe(make_table):
    # the same pull, but only 12 backgrounds carry the feature (the minimum lowered to 5 for this
    # small set): the pulled share drops below 5% of the other classes' objects and the
    # severity with it
    pi, truth = shortcut_per_image(pull=0.8)
    ob = np.asarray(pi["only_bg_pred"])
    feat = np.flatnonzero(truth["featured"])
    keep = feat[:12]
    ob[np.setdiff1d(feat, keep)] = np.asarray(pi["label_idx"])[np.setdiff1d(feat, keep)]
    mixed = np.asarray(pi["mixed_pred_all"])
    pos = {int(i): k for k, i in enumerate(pi["index"])}
    src = np.vectorize(pos.get)(np.asarray(pi["bg_source_index_all"]))
    lost = ~np.isin(src, keep) & np.isin(src, feat)
    mixed = np.where(lost, np.asarray(pi["label_idx"])[:, None], mixed)
    pi = {**pi, "only_bg_pred": ob.tolist(), "mixed_pred_all": mixed.tolist()}
    ctx = scan_ctx(make_table, pi, truth, options={"feature_min_backgrounds": 5})
    (f,) = run_detector(ctx, "spurious_feature").findings
    fig = ctx.attractors["classes"]["zero"]
    assert fig["pulled_share"] < 0.05
    assert f.severity == pytest.approx(min(1.0, fig["attraction_ci"][0] / 0.25) * fig["pulled_share"] / 0.05)
    assert f.severity < 0.9
