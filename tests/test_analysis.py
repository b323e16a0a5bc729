"""biasscope.analysis: CAM normalisation, SpRAy clustering, projection, statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from biasscope import analysis as A
from biasscope.analysis import analyse, cluster_class, fill_columns, heatmap_geometry, normalise_cams
from biasscope.errors import BiasscopeError

HW = 7


def blob(cy, cx, sigma=1.0, hw=HW):
    yy, xx = np.mgrid[:hw, :hw]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma)).astype(np.float32)


def table(label, pred=None, inside=None, **attrs):
    label = np.asarray(label, dtype=object)
    pred = label if pred is None else np.asarray(pred, dtype=object)
    n = len(label)
    t = pd.DataFrame({"path": [f"img_{i}.png" for i in range(n)], "label": label, "pred": pred,
                      "correct": label == pred,
                      "inside_frac": np.full(n, np.nan) if inside is None else inside})
    t["lift"] = t["inside_frac"] / 0.25
    t["pointing_hit"] = (t["inside_frac"] > 0.5).astype(float).where(t["inside_frac"].notna())
    for k, v in attrs.items():
        t[k] = v
    return t


def two_strategies(seed=0, n_centre=40, n_corner=30):
    """One class: CAMs on a centred object (small jitter) and CAMs on a fixed corner blob."""
    rng = np.random.default_rng(seed)
    centre = [blob(*(3 + rng.normal(0, 0.3, 2))) + rng.uniform(0, 0.03, (HW, HW)) for _ in range(n_centre)]
    corner = [blob(0.3, 0.3, 0.7) + rng.uniform(0, 0.03, (HW, HW)) for _ in range(n_corner)]
    heat = np.stack(centre + corner).astype(np.float16)
    inside = np.r_[rng.uniform(0.6, 0.9, n_centre), rng.uniform(0.0, 0.2, n_corner)]
    return table(["cat"] * (n_centre + n_corner), inside=inside), heat, np.arange(n_centre, n_centre + n_corner)


# --- normalisation and geometry ------------------------------------------------------------


def test_normalise_cams_unit_mass_and_zero_maps_marked():
    h = np.stack([blob(3, 3), np.zeros((HW, HW), np.float32), 5 * blob(1, 5)]).astype(np.float16)
    maps, zero = normalise_cams(h, grid=(16, 16))
    assert maps.shape == (3, 16, 16) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.reshape(3, -1).sum(axis=1), [1.0, 0.0, 1.0], atol=1e-5)
    assert zero.tolist() == [False, True, False]
    assert (maps[1] == 0).all()
    # Magnitude does not matter, only where the mass is.
    maps2, _ = normalise_cams(np.stack([blob(1, 5)]), grid=(16, 16))
    np.testing.assert_allclose(maps[2], maps2[0], atol=1e-4)


def test_normalise_cams_resamples_bilinearly_a_constant_stays_constant():
    maps, _ = normalise_cams(np.ones((2, 7, 7)), grid=(16, 16))
    np.testing.assert_allclose(maps, 1 / 256, rtol=1e-5)


@pytest.mark.parametrize("bad, what", [(-np.ones((1, 4, 4)), "non-negative"),
                                       (np.full((1, 4, 4), np.nan), "finite"),
                                       (np.ones((4, 4)), "shape")])
def test_normalise_cams_rejects_bad_input(bad, what):
    with pytest.raises(BiasscopeError, match=what):
        normalise_cams(bad)


def test_heatmap_geometry_corner_uniform_and_zero():
    point = np.zeros((1, 16, 16))
    point[0, 0, 0] = 1
    g = heatmap_geometry(np.concatenate([point, np.full((1, 16, 16), 1 / 256), np.zeros((1, 16, 16))]))
    assert g["cx"][0] == pytest.approx(0.5 / 16) and g["cy"][0] == pytest.approx(0.5 / 16)
    assert g["spread"][0] == pytest.approx(0.0, abs=1e-9)
    assert g["hot_area"][0] == pytest.approx(1 / 256)
    assert g["cx"][1] == pytest.approx(0.5) and g["hot_area"][1] == pytest.approx(0.5)
    assert g["spread"][1] == pytest.approx(np.sqrt(2 * (1 - 1 / 256) / 12), rel=1e-6)
    assert all(np.isnan(g[k][2]) for k in g)


# --- clustering ----------------------------------------------------------------------------


def test_planted_two_strategies_give_two_clusters_and_the_corner_is_located():
    t, heat, corner = two_strategies()
    cols, an = analyse(t, heat, projection="none")
    cl = cols["cluster"]
    assert an["classes"]["cat"]["clustering"]["k"] == 2
    # The clusters are exactly the planted groups.
    assert len(set(cl[corner])) == 1
    assert set(cl[: corner[0]]).isdisjoint(set(cl[corner]))
    assert len(set(cl[: corner[0]])) == 1
    corner_cluster = an["clusters"][int(cl[corner[0]])]
    assert corner_cluster["size"] == len(corner)
    assert corner_cluster["centroid"]["x"] < 0.3 and corner_cluster["centroid"]["y"] < 0.3
    assert corner_cluster["mean_inside_frac"] < 0.2
    assert corner_cluster["rest_mean_inside_frac"] > 0.6
    assert corner_cluster["centroid_jitter"] < 0.02
    assert corner_cluster["hot_area"] < 0.1
    assert corner_cluster["rest_mass_in_hot"] < 0.1
    centre = an["clusters"][int(cl[0])]
    assert abs(centre["centroid"]["x"] - 0.5) < 0.05 and abs(centre["centroid"]["y"] - 0.5) < 0.05
    assert np.array(corner_cluster["mean_heatmap"]).shape == (16, 16)


def test_eigengap_chooses_k_for_well_separated_groups_in_a_connected_graph():
    # Three tight groups, with one image bridging each pair so that the kNN graph is connected:
    # k must then come from the eigengap, not from counting components.
    rng = np.random.default_rng(1)
    centres = [(1, 1), (1, 5), (5, 3)]
    X = [blob(*c, 0.8) + rng.uniform(0, 0.02, (HW, HW)) for c in centres for _ in range(25)]
    for a, b in ((0, 1), (1, 2), (0, 2)):
        X += [w * blob(*centres[a], 0.8) + (1 - w) * blob(*centres[b], 0.8) for w in (0.3, 0.5, 0.7)]
    maps, _ = normalise_cams(np.stack(X))
    res = cluster_class(maps.reshape(len(maps), -1), n_neighbors=10, max_clusters=8)
    assert res["components"] == 1
    assert res["method"] == "spectral" and res["k_eigengap"] == 3 and res["k"] == 3
    # The three groups are recovered exactly (up to relabelling); bridges go anywhere.
    labels = res["labels"][:75].reshape(3, 25)
    assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == 3


def test_eigengap_picks_k_from_the_spectrum_when_the_graph_is_connected(monkeypatch):
    # Replace the spectrum to check the rule itself: the largest gap is after 3 eigenvalues.
    vals = np.array([0.0, 0.01, 0.02, 0.5, 0.55, 0.6])

    def fake(A, m, seed):
        n = A.shape[0]
        vecs = np.random.default_rng(0).normal(size=(n, m))
        return vals[:m], vecs, 1, np.zeros(n, np.int64)

    monkeypatch.setattr(A, "_laplacian_spectrum", fake)
    X = np.random.default_rng(0).random((30, 4))
    res = cluster_class(X, max_clusters=5)
    assert res["k_eigengap"] == 3 and res["k"] == 3


def test_small_class_gets_fewer_neighbours_and_still_splits():
    # 8 images (< n_neighbors + 1): two groups of 4.
    rng = np.random.default_rng(0)
    X = [blob(1, 1, 0.7) + rng.uniform(0, 0.02, (HW, HW)) for _ in range(4)]
    X += [blob(5, 5, 0.7) + rng.uniform(0, 0.02, (HW, HW)) for _ in range(4)]
    t = table(["dog"] * 8)
    cols, an = analyse(t, np.stack(X), n_neighbors=10, projection="none")
    info = an["classes"]["dog"]["clustering"]
    assert info["n_neighbors"] == 3
    assert info["k"] == 2
    assert len(set(cols["cluster"][:4])) == 1 and len(set(cols["cluster"][4:])) == 1
    assert cols["cluster"][0] != cols["cluster"][4]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_class_is_a_single_cluster(n):
    t = table(["x"] * n)
    cols, an = analyse(t, np.stack([blob(i, i) for i in range(n)]), projection="none")
    assert an["classes"]["x"]["clustering"]["method"] == "single"
    assert an["classes"]["x"]["clustering"]["k"] == 1
    assert (cols["cluster"] == 0).all()


def test_degenerate_graph_falls_back_to_kmeans():
    # Ten distinct maps, three near-copies each (exact copies are clustered once), two
    # neighbours: ten components > max_clusters.
    maps = [blob(y, x, 0.6) for y in (1, 3, 5) for x in (1, 3, 5)] + [blob(6, 0, 0.6)]
    X = np.repeat(np.stack(maps), 3, axis=0)
    X = X * (1 + 1e-4 * np.random.default_rng(0).random(X.shape))
    t = table(["z"] * len(X))
    cols, an = analyse(t, X, n_neighbors=2, max_clusters=8, projection="none")
    info = an["classes"]["z"]["clustering"]
    assert info["method"] == "kmeans" and "max_clusters" in info["reason"]
    assert 1 <= info["k"] <= 8
    # Copies of one map always share a cluster.
    assert (cols["cluster"].reshape(10, 3) == cols["cluster"].reshape(10, 3)[:, :1]).all()


def test_cluster_ids_are_global_and_zero_cams_are_unclustered():
    rng = np.random.default_rng(3)
    heat = np.stack([blob(*rng.uniform(1, 5, 2)) for _ in range(30)])
    heat[[4, 17]] = 0  # all-zero CAMs
    label = np.array(["a"] * 10 + ["b"] * 10 + ["c"] * 10, dtype=object)
    t = table(label)
    cols, an = analyse(t, heat, projection="none")
    cl = cols["cluster"]
    assert cl[4] == A.NO_CLUSTER and cl[17] == A.NO_CLUSTER
    assert cols["cam_zero"].tolist() == [i in (4, 17) for i in range(30)]
    assert an["n_zero_cams"] == 2 and an["zero_cam_rows"] == [4, 17]
    ids = [c["id"] for c in an["clusters"]]
    assert ids == list(range(len(ids)))
    for c, cids in an["class_clusters"].items():
        members = np.flatnonzero(np.isin(cl, cids))
        assert set(t["pred"].to_numpy()[members]) == {c}
        for cid in cids:
            assert an["clusters"][cid]["class"] == c
            assert an["clusters"][cid]["size"] == int((cl == cid).sum())
    assert (cl[cols["cam_zero"] == False] >= 0).all()  # noqa: E712
    filled = fill_columns(t.assign(cluster=pd.NA, embed_x=np.nan, embed_y=np.nan), cols)
    assert str(filled["cluster"].dtype) == "Int32"
    assert filled["cluster"].isna().tolist() == [i in (4, 17) for i in range(30)]
    assert an["classes"]["a"]["clustering"]["n_zero_cams"] == 1


def test_single_class_no_masks_no_attributes_is_json_and_has_none_statistics():
    t, heat, _ = two_strategies()
    t["inside_frac"] = np.nan
    t["lift"] = np.nan
    t["pointing_hit"] = np.nan
    cols, an = analyse(t, heat, projection="none")
    json.dumps(an, allow_nan=False)
    st = an["classes"]["cat"]
    assert st["n"] == 70 and st["accuracy"] == 1.0
    assert st["mean_inside_frac"] is None and st["mean_lift"] is None and st["n_with_mask"] == 0
    assert an["groups"] == {} and an["attributes"] == []
    assert all(c["mean_inside_frac"] is None for c in an["clusters"])


def test_class_and_group_statistics():
    label = np.array(["a"] * 6 + ["b"] * 4, dtype=object)
    pred = label.copy()
    pred[[0, 1, 6]] = ["b", "b", "a"]
    inside = np.array([0.2, 0.4, 0.6, 0.8, np.nan, 1.0, 0.5, 0.5, 0.5, 0.5])
    bg = np.array(["grass", "grass", "sand", "sand", "sand", None, "grass", "sand", "sand", "sand"], dtype=object)
    t = table(label, pred, inside, background=bg)
    heat = np.stack([blob(3, 3)] * 10)
    _, an = analyse(t, heat, projection="none")
    a = an["classes"]["a"]
    assert (a["n"], a["n_correct"], a["n_pred"]) == (6, 4, 5)
    assert a["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert a["mean_inside_frac"] == pytest.approx(0.6) and a["median_inside_frac"] == pytest.approx(0.6)
    assert a["n_with_mask"] == 5 and a["pointing_rate"] == pytest.approx(0.6)
    assert an["attributes"] == ["background"]
    groups = {(g["class"], g["value"]): g for g in an["groups"]["background"]}
    assert groups[("a", "grass")]["n"] == 2 and groups[("a", "grass")]["accuracy"] == 0.0
    assert groups[("a", "sand")]["n"] == 3 and groups[("a", "sand")]["accuracy"] == 1.0
    assert groups[("b", "sand")]["accuracy"] == 1.0 and groups[("b", "grass")]["accuracy"] == 0.0
    assert sum(g["n"] for g in an["groups"]["background"]) == 9  # the missing value is no group


def test_deterministic_with_seed_and_json_serialisable():
    t, heat, _ = two_strategies(seed=2)
    c1, a1 = analyse(t, heat, seed=5, projection="tsne")
    c2, a2 = analyse(t, heat, seed=5, projection="tsne")
    for k in c1:
        np.testing.assert_array_equal(c1[k], c2[k])
    assert json.dumps(a1, allow_nan=False) == json.dumps(a2, allow_nan=False)
    assert np.isfinite(c1["embed_x"]).all() and np.isfinite(c1["embed_y"]).all()
    assert a1["projection"]["method"] == "tsne"


def test_projection_methods_and_subsampled_tsne(monkeypatch):
    X = np.random.default_rng(0).random((120, 20)).astype(np.float32)
    xy, info = A.project(X, method="none")
    assert np.isnan(xy).all()
    xy, info = A.project(X[:3], method="tsne")
    assert info["method"] == "pca" and xy.shape == (3, 2)
    with pytest.raises(BiasscopeError, match="projection"):
        A.project(X, method="mds")
    # The large-N path: PCA first, t-SNE on a subsample, the rest placed among neighbours.
    monkeypatch.setattr(A, "_TSNE_PCA_ABOVE", 50)
    monkeypatch.setattr(A, "_TSNE_FIT_MAX", 60)
    xy, info = A.project(X, method="tsne", seed=1)
    assert info["n_fit"] == 60 and info["pca_dims"] == 20
    assert xy.shape == (120, 2) and np.isfinite(xy).all()
    xy2, _ = A.project(X, method="tsne", seed=1)
    np.testing.assert_array_equal(xy, xy2)


def test_analyse_validates_inputs():
    t, heat, _ = two_strategies()
    with pytest.raises(BiasscopeError, match="heatmaps"):
        analyse(t, heat[:-1])
    with pytest.raises(BiasscopeError, match="lacks"):
        analyse(t.drop(columns=["pred"]), heat)
    with pytest.raises(BiasscopeError, match="attribute"):
        analyse(t, heat, attributes=["nope"], projection="none")


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_all_zero_or_identical_heatmaps(value):
    # All-zero CAMs: nothing to cluster. Identical CAMs: one cluster per class. Either way the
    # projection falls back to PCA (t-SNE cannot embed identical points) and stays finite.
    t = table(["a"] * 20 + ["b"] * 5)
    cols, an = analyse(t, np.full((25, HW, HW), value), projection="tsne")
    assert an["projection"]["method"] == "pca"
    assert np.isfinite(cols["embed_x"]).all() and np.isfinite(cols["embed_y"]).all()
    if value == 0.0:
        assert (cols["cluster"] == A.NO_CLUSTER).all() and an["n_zero_cams"] == 25
        assert an["clusters"] == [] and an["class_clusters"] == {"a": [], "b": []}
    else:
        assert cols["cluster"].tolist() == [0] * 20 + [1] * 5
    json.dumps(an, allow_nan=False)


def test_analyse_runs_single_threaded(monkeypatch):
    # Two OpenMP/BLAS threads on two busy cores made the analysis several times slower; the
    # limit must hold for the libraries loaded lazily by scikit-learn too.
    from threadpoolctl import threadpool_info

    seen = []
    real = A._analyse

    def spy(*args, **kwargs):
        seen.extend(i["num_threads"] for i in threadpool_info()
                    if i["user_api"] in ("openmp", "blas"))
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "_analyse", spy)
    t, heat, _ = two_strategies()
    analyse(t, heat, projection="none")
    assert seen and set(seen) == {1}


def test_large_class_is_clustered_on_a_sample_and_the_rest_join_their_neighbours():
    # three strategies (hot spots) of 400 images each; fitted on 300, the other 900 assigned
    rng = np.random.default_rng(3)
    spots = [(1, 1), (1, 6), (6, 3)]
    maps = np.stack([blob(*spots[i % 3], 0.8) + rng.uniform(0, 0.05, (HW, HW)) for i in range(1200)])
    truth = np.arange(1200) % 3
    X = (maps / maps.sum(axis=(1, 2), keepdims=True)).reshape(1200, -1)
    capped = cluster_class(X, max_fit=300, seed=1)
    full = cluster_class(X, seed=1)
    assert capped["n_fit"] == 300 and full["n_fit"] == 1200 and capped["k"] == full["k"] == 3
    # the same partition as the full fit and as the planted strategies (labels up to renaming)
    for labels in (capped["labels"], full["labels"]):
        pairs = set(zip(truth.tolist(), labels.tolist()))
        assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3


def test_copies_of_a_map_join_their_originals_cluster():
    """A class whose images are listed several times (or that holds exact copies) is clustered
    as its distinct maps: the copies do not break the kNN graph into one clique per image."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 16))
    a[:30] += 4
    once = A.cluster_class(a, seed=0)
    five = A.cluster_class(np.concatenate([a] * 5), seed=0)
    assert once["k"] == five["k"] == 2 and five["method"] == "spectral"
    assert five["n_distinct"] == 60
    for k in range(5):
        np.testing.assert_array_equal(five["labels"][60 * k:60 * (k + 1)], once["labels"])


_HELPER_ANALYSE = """
import json, os, pickle, signal, sys
from biasscope import helper
h = helper.start(analysis=True)  # as the console script does, before anything else
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_analysis import two_strategies
from biasscope.analysis import analyse
t, heat, _ = two_strategies(seed=3)
t["top5"] = [[0]] * len(t)  # a list column: left out of what is sent
kw = dict(seed=4, projection="tsne")
local = analyse(t, heat, **kw)
slim = t.drop(columns=["top5"])
assert h.submit("analyse", ((slim, heat), kw))
remote = h.result()
assert remote is not None
for k in local[0]:
    np.testing.assert_array_equal(local[0][k], remote[0][k])
assert json.dumps(local[1], allow_nan=False) == json.dumps(remote[1], allow_nan=False)
# heatmaps sent as the path of a stored .npy file are mapped from it
np.save(sys.argv[2], heat)
ref = helper.heatmaps_ref(np.load(sys.argv[2], mmap_mode="r"))
assert ref == ("npy", sys.argv[2])
assert h.submit("analyse", ((slim, ref), kw))
mapped = h.result()
assert json.dumps(local[1], allow_nan=False) == json.dumps(mapped[1], allow_nan=False)
# a bad request comes back as a failure (None): the caller computes it itself
assert h.submit("analyse", ((slim, heat[:-1]), kw)) and h.result() is None
os.kill(h.pid, signal.SIGKILL)
# gone: the request is refused, or it fails; nothing hangs
assert not h.submit("analyse", ((slim, heat), kw)) or h.result() is None
print("ok")
"""


def test_the_helper_process_gives_the_same_analysis(tmp_path):
    """The console script's helper runs ``analyse`` on what the scan sends it (the table
    without its list columns) with the same result; a failure there is None, a dead helper
    refuses requests."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", _HELPER_ANALYSE, str(Path(__file__).parent),
                        str(tmp_path / "heat.npy")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_first_copies_groups_rows_as_numpys_unique_does():
    """The hashed grouping of equal maps gives, row for row, the first copy that
    ``np.unique(axis=0)`` gives: on random repeats of a few rows (float32 and float64), with
    zeros of either sign, and with NaNs (which np.unique decides)."""
    from biasscope.analysis import _first_copies

    def ref(X):
        _, first, inverse = np.unique(X.reshape(len(X), -1), axis=0, return_index=True, return_inverse=True)
        return first[np.ravel(inverse)]

    rng = np.random.default_rng(1)
    for trial in range(100):
        n, D = int(rng.integers(1, 300)), int(rng.integers(1, 20))
        base = rng.integers(0, 3, (max(1, n // 3), D)).astype(np.float64)
        base[rng.random(base.shape) < 0.2] = -0.0
        X = base[rng.integers(0, len(base), n)]
        X = X.astype(np.float32) if trial % 2 else X
        np.testing.assert_array_equal(_first_copies(X), ref(X), err_msg=str(trial))
    X = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 0.0], [np.nan, 1.0], [np.nan, 1.0]])
    np.testing.assert_array_equal(_first_copies(X[:3]), [0, 0, 2])
    np.testing.assert_array_equal(_first_copies(X), ref(X))
    assert _first_copies(np.zeros((0, 4))).shape == (0,)
