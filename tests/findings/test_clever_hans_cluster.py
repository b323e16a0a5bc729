"""clever_hans_cluster: a coherent heatmap cluster off the object or at one fixed spot."""

import numpy as np
import pytest

from biasscope.analysis import analyse, fill_columns
from biasscope.findings import Context, run_detector


def _run(table, heat, **options):
    cols, an = analyse(table, heat, projection="none")
    ctx = Context(table=fill_columns(table, cols), heatmaps=heat, analysis=an, options=options)
    return run_detector(ctx, "clever_hans_cluster"), an


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_corner_cluster_is_found_and_located(make_planted, seed):
    t, heat, corner = make_planted(seed)
    res, an = _run(t, heat)
    (f,) = res.findings
    assert f.class_ == "a" and f.scope == "cluster"
    assert set(f.evidence["reasons"]) == {"off_object", "fixed_location"}
    assert f.evidence["centroid"]["x"] < 0.3 and f.evidence["centroid"]["y"] < 0.3
    assert f.evidence["size"] == len(corner)
    assert f.evidence["mean_inside_frac"] < 0.25 and f.evidence["rest_mean_inside_frac"] > 0.6
    assert np.array(f.evidence["mean_heatmap"]).shape == (16, 16)
    assert f.severity == pytest.approx(1.0)  # strong evidence, 40% of the class
    # The flags are exactly the corner images.
    assert np.flatnonzero(res.flags).tolist() == corner.tolist()
    assert all(p.startswith("a/") for p in f.examples)


def test_found_without_masks_by_location_alone(make_planted):
    t, heat, corner = make_planted(0, masks=False)
    res, _ = _run(t, heat)
    (f,) = res.findings
    assert f.evidence["reasons"] == ["fixed_location"]
    assert np.flatnonzero(res.flags).tolist() == corner.tolist()


def test_classes_of_object_centred_attention_give_nothing(make_planted):
    t, heat, _ = make_planted(0, n_corner=0)
    res, an = _run(t, heat)
    assert res.findings == [] and not res.flags.any()


def test_a_cluster_too_small_is_ignored(make_planted):
    t, heat, corner = make_planted(0, n_corner=4)
    res, _ = _run(t, heat)
    assert res.findings == []


def test_an_on_object_spot_is_not_a_shortcut(make_planted):
    # Same corner cluster, but the masks say the object is there.
    t, heat, corner = make_planted(0)
    t.loc[corner, "inside_frac"] = 0.9
    res, _ = _run(t, heat)
    assert res.findings == []


def test_skipped_without_analysis(make_planted):
    t, heat, _ = make_planted(0)
    res = run_detector(Context(table=t, heatmaps=heat), "clever_hans_cluster")
    assert "no cluster analysis" in res.skipped


def test_without_the_cluster_column_findings_but_no_flags(make_planted):
    t, heat, _ = make_planted(0)
    cols, an = analyse(t, heat, projection="none")
    res = run_detector(Context(table=t, analysis=an), "clever_hans_cluster")
    assert len(res.findings) == 1 and res.flags is None


def _hand_analysis(**over):
    """Class 'a' of 100 images: cluster 0 (the candidate) and cluster 1 (the rest)."""
    cand = {"id": 0, "class": "a", "size": 30, "n_with_mask": 0, "mean_inside_frac": None,
            "rest_mean_inside_frac": None, "hot_area": 0.05, "centroid_jitter": 0.01,
            "rest_mass_in_hot": 0.05, "centroid": {"x": 0.9, "y": 0.1}, "examples": ["a/1.png"]}
    cand.update(over)
    rest = {"id": 1, "class": "a", "size": 100 - cand["size"], "n_with_mask": 0,
            "mean_inside_frac": None, "rest_mean_inside_frac": None, "hot_area": 0.3,
            "centroid_jitter": 0.2, "rest_mass_in_hot": 0.1, "centroid": {"x": 0.5, "y": 0.5}}
    return {"clusters": [cand, rest]}


@pytest.mark.parametrize("over, found", [
    ({}, True),                                  # fixed spot, the rest looks elsewhere
    ({"hot_area": 0.2}, False),                  # not concentrated
    ({"centroid_jitter": 0.08}, False),          # members do not agree on one spot
    ({"rest_mass_in_hot": 0.4}, False),          # the rest of the class looks there too
    ({"size": 4}, False),                        # too small (< 5)
    ({"n_with_mask": 30, "mean_inside_frac": 0.8, "rest_mean_inside_frac": 0.8}, False),  # on the object
    ({"hot_area": 0.5, "n_with_mask": 30, "mean_inside_frac": 0.2,
      "rest_mean_inside_frac": 0.7}, True),      # diffuse but off the object
    ({"hot_area": 0.5, "n_with_mask": 30, "mean_inside_frac": 0.45,
      "rest_mean_inside_frac": 0.55}, False),    # off-object gap too small
])
def test_decision_rule_on_hand_made_clusters(make_table, over, found):
    t = make_table(["a"], np.zeros(100, int))
    res = run_detector(Context(table=t, analysis=_hand_analysis(**over)), "clever_hans_cluster")
    assert bool(res.findings) is found
    if found:
        assert res.findings[0].cluster == 0


def test_severity_grows_with_the_share_of_the_class(make_table):
    t = make_table(["a"], np.zeros(100, int))
    sev = [run_detector(Context(table=t, analysis=_hand_analysis(size=s)), "clever_hans_cluster")
           .findings[0].severity for s in (6, 15, 25, 40)]
    # strength (0.5 - 0.05) / 0.5 = 0.9, weight 0.5 + 0.5 * min(1, share / 0.25)
    np.testing.assert_allclose(sev, [0.9 * (0.5 + 0.5 * s / 25) for s in (6, 15, 25)] + [0.9])


def test_a_causal_spot_that_is_all_of_the_classs_predictions_is_at_a_fixed_location(make_table):
    """One cluster holding every prediction of the class (no rest to compare with, so no
    ``rest_mass_in_hot``), at one spot, confirmed by occlusion: the reason names the spot."""
    t = make_table(["a"], np.zeros(100, int))
    an = {"clusters": [{"id": 0, "class": "a", "size": 100, "n_with_mask": 0, "mean_inside_frac": None,
                        "rest_mean_inside_frac": None, "hot_area": 0.05, "centroid_jitter": 0.01,
                        "rest_mass_in_hot": None, "centroid": {"x": 0.9, "y": 0.1},
                        "examples": ["a/1.png"]}]}
    occ = {"clusters": {"0": {"n": 100, "changed_rate": 0.9, "changed_ci": [0.82, 0.95],
                              "control_changed_rate": 0.05, "n_wrong": 20, "n_repaired": 16,
                              "repaired_share": 0.8}}}
    res = run_detector(Context(table=t, analysis=an, occlusion=occ), "clever_hans_cluster")
    assert res.findings and res.findings[0].evidence["reasons"] == ["occlusion", "fixed_location"]
    # a spread-out one (not at one spot) keeps only the occlusion reason
    an["clusters"][0]["centroid_jitter"] = 0.2
    res = run_detector(Context(table=t, analysis=an, occlusion=occ), "clever_hans_cluster")
    assert res.findings[0].evidence["reasons"] == ["occlusion"]
