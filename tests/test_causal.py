"""biasscope.causal: which clusters to occlude, what the occlusion result says, the causal rule."""

import numpy as np
import pandas as pd
import pytest

from biasscope import causal
from biasscope.causal import candidates, is_causal, summarise, wilson
from biasscope.findings.base import DEFAULT_OPTIONS

O = dict(DEFAULT_OPTIONS)  # cluster_min_size 5, cluster_min_share 0.05, cluster_hot_area 0.1,
#                            cluster_jitter 0.04, occlusion_min_change 0.3, occlusion_min_excess 0.2


# --- wilson ---------------------------------------------------------------------------------


def test_wilson_against_hand_computed_intervals():
    # k=0, n=10: centre = (z^2/2n) / (1 + z^2/n) = 0.19208 / 1.38416 = 0.138770, half-width the same
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(2 * 0.19208 / 1.38416, abs=1e-9)
    assert hi == pytest.approx(0.27754, abs=1e-5)
    # k=5, n=10: centre 0.5, half-width z sqrt(0.025 + z^2/400) / 1.38416 = 0.263403
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-5) and hi == pytest.approx(0.763407, abs=1e-5)
    # k=n: symmetric to k=0
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.27754, abs=1e-5)
    assert wilson(0, 0) is None
    # z = 0: the point estimate
    assert wilson(3, 12, z=0.0) == [0.25, 0.25]


# --- candidates -----------------------------------------------------------------------------


def _cl(id_, cls="a", size=20, hot=0.05, jitter=0.01, heat=True):
    return {"id": id_, "class": cls, "size": size, "hot_area": hot, "centroid_jitter": jitter,
            "mean_heatmap": np.ones((16, 16)).tolist() if heat else None}


def test_candidates_keep_large_clusters_at_one_spot():
    clusters = [
        _cl(0, size=20), _cl(1, size=30),
        _cl(2, size=4),                        # below cluster_min_size (5)
        _cl(3, hot=0.1001), _cl(4, hot=0.1),   # hot area just above / at the threshold
        _cl(5, jitter=0.0401), _cl(6, jitter=0.04),
        _cl(7, heat=False), {**_cl(8), "hot_area": None}, {**_cl(9), "centroid_jitter": None},
        # class b has 400 images: a cluster needs 5% of them (20)
        _cl(10, "b", size=19), _cl(11, "b", size=20), _cl(12, "b", size=361, hot=0.5),
    ]
    got = [cl["id"] for cl in candidates(clusters, O)]
    assert got == [1, 0, 4, 6, 11]  # largest first, ties by id
    assert candidates([], O) == [] and candidates(None, O) == []
    many = [_cl(i, size=100 + i) for i in range(12)]
    assert [cl["id"] for cl in candidates(many, O)] == list(range(11, 3, -1))  # MAX_CLUSTERS = 8


# --- summarise ------------------------------------------------------------------------------

CLASS_INDEX = {"a": 0, "b": 1, "c": 2, "d": 3}


def _summary_case():
    # members (cluster 3, predicted a): 10, 11, 12 labelled b (wrong), 13, 14, 15 labelled a
    # the rest of class a's predictions: 20, 21, 22; controls (predicted c): 30..33
    idx = np.array([10, 11, 12, 13, 14, 15, 20, 21, 22, 30, 31, 32, 33])
    label = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2])
    orig = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2])
    occl = np.array([1, 1, 2, 0, 3, 0, 1, 0, 0, 0, 2, 2, 2])
    order = np.random.default_rng(0).permutation(idx.size)  # the table's order does not matter
    table = pd.DataFrame({"index": idx[order], "label_idx": label[order]})
    tests = [{"id": "c3", "cluster": 3, "n_members": 6, "n_rest": 3,
              "region": np.zeros((8, 8), bool)},
             {"id": "c9", "cluster": 9, "n_members": 2, "n_rest": 0, "region": np.zeros((8, 8), bool)}]
    result = {"tests": {"c3": {"rows": idx.tolist(), "orig_pred": orig.tolist(),
                               "occluded_pred": occl.tolist(), "region_share": 0.05}}}
    return tests, result, table


def test_summarise_counts_members_rest_and_controls():
    tests, result, table = _summary_case()
    out = summarise(tests, result, table, CLASS_INDEX)
    assert set(out) == {"3"}  # c9 has no result: left out
    s = out["3"]
    assert s["n"] == 6 and s["n_changed"] == 4  # 10, 11, 12, 14
    assert s["changed_rate"] == pytest.approx(4 / 6)
    assert s["changed_ci"] == pytest.approx(wilson(4, 6))
    assert s["n_control"] == 4 and s["control_changed_rate"] == 0.25  # 30 only
    assert s["n_rest"] == 3 and s["rest_changed_rate"] == pytest.approx(1 / 3)  # 20 only
    assert s["n_wrong"] == 3 and s["n_repaired"] == 2  # 10, 11 back to b; 12 went to c
    assert s["repaired_share"] == pytest.approx(2 / 3)
    assert s["moved_to"] == {"b": 2, "c": 1, "d": 1} and list(s["moved_to"])[0] == "b"
    assert s["region_share"] == 0.05
    assert s["index"] == [10, 11, 12, 13, 14, 15, 20, 21, 22]  # members and rest, no controls
    assert s["changed"] == [True, True, True, False, True, False, True, False, False]


def test_summarise_without_wrong_members_and_region_share_from_the_region():
    tests, result, table = _summary_case()
    r = result["tests"]["c3"]
    r.pop("region_share")
    r["orig_pred"] = [1, 1, 1] + r["orig_pred"][3:]  # the members labelled b are now right
    region = np.zeros((8, 8), bool)
    region[:2, :4] = True
    tests[0]["region"] = region
    s = summarise(tests, result, table, CLASS_INDEX)["3"]
    assert s["n_wrong"] == 0 and s["n_repaired"] == 0 and s["repaired_share"] is None
    assert s["region_share"] == pytest.approx(8 / 64)
    assert s["n_changed"] == 2 and s["moved_to"] == {"c": 1, "d": 1}  # 12 and 14


# --- is_causal --------------------------------------------------------------------------------


def fig(lo=0.6, rate=0.8, control=0.1, n=20, n_wrong=0, repaired=None):
    return {"n": n, "changed_ci": [lo, min(1.0, rate + 0.1)], "changed_rate": rate,
            "control_changed_rate": control, "n_wrong": n_wrong, "repaired_share": repaired}


@pytest.mark.parametrize("t, off, expected", [
    (fig(), True, True),                                   # off the object (masks)
    (fig(), False, False),                                 # ... not shown without masks
    (fig(n_wrong=5, repaired=0.5), False, True),           # mistakes come back to their label
    (fig(n_wrong=4, repaired=1.0), False, False),          # too few wrong members
    (fig(n_wrong=10, repaired=0.49), False, False),        # too few repaired
    (fig(rate=0.5, control=0.31), True, False),            # excess over controls 0.19 < 0.2
    (fig(lo=0.5, rate=0.5, control=0.3), True, True),      # excess at the threshold
    (fig(lo=0.29), True, False),                           # lower bound below 0.3
    (fig(lo=0.3), True, True),
    (None, True, False), ({}, True, False), (fig(n=0), True, False),
    ({**fig(), "changed_ci": None}, True, False),
])
def test_is_causal_rule(t, off, expected):
    ok, strength = is_causal(t, O, off_object=off)
    assert ok is expected
    assert (strength > 0) is expected and 0.0 <= strength <= 1.0


def test_is_causal_strength():
    # excess taken from the lower bound: (lo - control) / 0.4, capped at 1; 0.5 at the thresholds
    assert is_causal(fig(lo=0.5, rate=0.6, control=0.3), O, off_object=True)[1] == pytest.approx(0.5)
    assert is_causal(fig(lo=0.3, rate=0.35, control=0.1), O, off_object=True)[1] == pytest.approx(0.5)
    assert is_causal(fig(lo=0.6, rate=0.8, control=0.1), O, off_object=True)[1] == 1.0
    assert is_causal(fig(lo=0.4, rate=0.6, control=None), O, off_object=True)[1] == pytest.approx(1.0)
    # the lower bound below the controls' rate: causal by the point estimate, strength 0
    ok, s = is_causal(fig(lo=0.35, rate=0.7, control=0.4), O, off_object=True)
    assert ok and s == 0.0
    # stricter options
    assert not is_causal(fig(lo=0.5, rate=0.6, control=0.3), {**O, "occlusion_min_change": 0.51},
                         off_object=True)[0]
    assert not is_causal(fig(lo=0.5, rate=0.6, control=0.3), {**O, "occlusion_min_excess": 0.31},
                         off_object=True)[0]


# --- plan -----------------------------------------------------------------------------------


def test_plan_rows_and_region(monkeypatch):
    from biasscope.occlusion import region_from_heatmap

    # rows: 12 members of cluster 2 (predicted a), 6 other a predictions (cluster 1),
    # 8 predictions of b (cluster 0), 2 a predictions without a cluster; shuffled
    cluster = [2] * 12 + [1] * 6 + [0] * 8 + [None] * 2
    pred = ["a"] * 18 + ["b"] * 8 + ["a"] * 2
    order = np.random.default_rng(1).permutation(len(pred))
    index = 100 + 7 * np.arange(len(pred))
    table = pd.DataFrame({"index": index[order], "pred": np.array(pred)[order],
                          "cluster": pd.array(np.array(cluster, dtype=object)[order], dtype="Int32")})
    heat = np.zeros((16, 16))
    heat[1:3, 12:14] = 1.0  # a spot at the top right
    analysis = {"clusters": [
        {"id": 2, "class": "a", "size": 12, "hot_area": 0.02, "centroid_jitter": 0.01,
         "mean_heatmap": heat.tolist()},
        {"id": 1, "class": "a", "size": 6, "hot_area": 0.5, "centroid_jitter": 0.2,
         "mean_heatmap": np.ones((16, 16)).tolist()},   # spread out: not a candidate
        {"id": 0, "class": "b", "size": 8, "hot_area": 0.3, "centroid_jitter": 0.1,
         "mean_heatmap": np.ones((16, 16)).tolist()},
    ]}
    (t,) = causal.plan(analysis, table, (32, 32), O)
    pos = {int(v): k for k, v in enumerate(index)}
    kind = np.array(["member"] * 12 + ["rest"] * 6 + ["control"] * 8 + ["rest"] * 2)
    rows = [kind[pos[int(r)]] for r in t["rows"]]
    assert t["id"] == "c2" and t["cluster"] == 2 and t["n_members"] == 12 and t["n_rest"] == 8
    assert rows == ["member"] * 12 + ["rest"] * 8 + ["control"] * 8
    assert sorted(t["rows"][:12]) == sorted(index[:12].tolist())
    assert len(set(t["rows"].tolist())) == len(t["rows"])
    assert t["region"].shape == (32, 32) and t["region"].dtype == bool
    np.testing.assert_array_equal(t["region"], region_from_heatmap(heat, (32, 32), mass=0.5, grow=1))
    assert t["region"][2:6, 24:28].all() and not t["region"][16:, :16].any()
    # no cluster column: nothing to test; sampling: sorted subsets, deterministic in the seed
    assert causal.plan(analysis, table.drop(columns=["cluster"]), (32, 32), O) == []
    monkeypatch.setattr(causal, "MAX_MEMBERS", 5)
    monkeypatch.setattr(causal, "MAX_CONTROLS", 3)
    (a,) = causal.plan(analysis, table, (32, 32), O, seed=4)
    (b,) = causal.plan(analysis, table, (32, 32), O, seed=4)
    np.testing.assert_array_equal(a["rows"], b["rows"])
    assert (a["n_members"], a["n_rest"], len(a["rows"])) == (5, 5, 13)
    kinds = [kind[pos[int(r)]] for r in a["rows"]]
    assert kinds == ["member"] * 5 + ["rest"] * 5 + ["control"] * 3
    row_of = {int(v): k for k, v in enumerate(table["index"])}
    for part in (a["rows"][:5], a["rows"][5:10], a["rows"][10:]):  # each in table order
        assert list(part) == sorted(part, key=lambda r: row_of[int(r)])
