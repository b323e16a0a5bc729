"""Occlusion tests on hand-made heatmaps, hand-computed fills and a model of known behaviour.

The model (``corner_model``) reads only the mean of the image's top-left 4x4 corner
(Cropping2D + GlobalAveragePooling2D + a Dense with hand-set weights): output 0 when the corner
is bright (mean > 150), output 2 otherwise; output 1 never wins. The images are dark noise
(0..90); a "watermarked" image has its corner at 230. Hiding the corner of a watermarked image
must therefore move its prediction from 0 to 2, and hiding anything else must change nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from biasscope.analysis import to_jsonable  # noqa: E402
from biasscope.data import load_dataset  # noqa: E402
from biasscope.errors import BiasscopeError  # noqa: E402
from biasscope.occlusion import occlude, region_from_heatmap, run_occlusion  # noqa: E402

S = 16
K = 4  # the corner the model reads: rows and columns 0..3
CORNER = np.zeros((S, S), bool)
CORNER[:K, :K] = True
ELSEWHERE = np.zeros((S, S), bool)
ELSEWHERE[8:, 8:] = True
RUN = {"image_size": (S, S), "channels": 3, "progress": False}


def corner_model(scale: float = 1.0):
    """Logits from m = mean of the corner (in 0..255 units, inputs multiplied by ``scale``):
    (m - 150, -1000, 150 - m)."""
    inp = keras.Input((S, S, 3))
    x = keras.layers.Cropping2D(((0, S - K), (0, S - K)))(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inp, out)
    w = np.array([[1.0, 0.0, -1.0]] * 3, np.float32) / (3.0 * scale)
    model.get_layer("head").set_weights([w, np.array([-150, -1000, 150], np.float32)])
    return model


def make_data(n_marked=6, n_plain=5, seed=0):
    """``n_marked`` watermarked images (label 0), then ``n_plain`` plain ones (label 2)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n_marked + n_plain, S, S, 3)).astype(np.uint8)
    images[:n_marked, :K, :K] = 230
    labels = np.array([0] * n_marked + [2] * n_plain)
    return images, labels


@pytest.fixture(scope="module")
def model():
    return corner_model()


@pytest.fixture(scope="module")
def data():
    return load_dataset(make_data(), n_outputs=3)


def _tests(region_from_hm):
    marked, plain = np.arange(6), np.arange(6, 11)
    return [
        {"id": "corner", "rows": marked, "region": region_from_hm},
        {"id": "elsewhere", "rows": marked, "region": ELSEWHERE},
        {"id": "corner_plain", "rows": plain, "region": region_from_hm},
        # repeated rows, within the test and across tests
        {"id": "repeat", "rows": np.array([0, 0, 7, 1, 0, 7]), "region": CORNER},
    ]


@pytest.fixture(scope="module")
def corner_region():
    hm = np.zeros((4, 4))
    hm[0, 0] = 1.0  # a 4x4 heatmap whose hot cell is the model's corner
    region = region_from_heatmap(hm, (S, S), grow=0)
    np.testing.assert_array_equal(region, CORNER)
    return region


@pytest.fixture(scope="module", params=[4, 16])
def result(request, model, data, corner_region):
    return run_occlusion(model, data, _tests(corner_region), batch_size=request.param, **RUN)


# --- region_from_heatmap ------------------------------------------------------------------------


def test_a_single_hot_cell_gives_its_pixels_and_grows_by_whole_cells():
    hm = np.zeros((4, 4))
    hm[1, 2] = 5.0
    r0 = region_from_heatmap(hm, (16, 16), grow=0)
    want = np.zeros((16, 16), bool)
    want[4:8, 8:12] = True
    np.testing.assert_array_equal(r0, want)
    r1 = region_from_heatmap(hm, (16, 16), grow=1)
    want = np.zeros((16, 16), bool)
    want[0:12, 4:16] = True  # cells (0..2, 1..3): the 3x3 neighbourhood
    np.testing.assert_array_equal(r1, want)
    assert r0.dtype == bool and r1.dtype == bool
    # at the border the neighbourhood is clipped
    hm = np.zeros((4, 4))
    hm[3, 0] = 1.0
    want = np.zeros((16, 16), bool)
    want[8:16, 0:8] = True
    np.testing.assert_array_equal(region_from_heatmap(hm, (16, 16), grow=1), want)
    want = np.zeros((16, 16), bool)
    want[4:16, 0:12] = True
    np.testing.assert_array_equal(region_from_heatmap(hm, (16, 16), grow=2), want)


def test_the_mass_rule_takes_the_fewest_hottest_cells():
    hm = np.zeros((2, 2))
    hm[0, 0], hm[0, 1], hm[1, 1] = 0.3, 0.3, 0.4
    cells = region_from_heatmap(hm, (2, 2), mass=0.5, grow=0)
    # 0.4 alone is short of half; with the first 0.3 (stable order) it is enough
    np.testing.assert_array_equal(cells, [[True, False], [False, True]])
    np.testing.assert_array_equal(region_from_heatmap(hm, (2, 2), mass=0.4, grow=0),
                                  [[False, False], [False, True]])
    # any scale; all positive cells for mass=1, never the empty ones
    np.testing.assert_array_equal(region_from_heatmap(hm * 1e4, (2, 2), mass=0.5, grow=0), cells)
    np.testing.assert_array_equal(region_from_heatmap(hm, (2, 2), mass=1.0, grow=0),
                                  [[True, True], [False, True]])
    # ties: the first cells in row-major order; float rounding does not add a cell
    np.testing.assert_array_equal(region_from_heatmap(np.ones((2, 2)), (2, 2), mass=0.5, grow=0),
                                  [[True, True], [False, False]])
    tenth = np.full((1, 10), 0.1)
    assert region_from_heatmap(tenth, (1, 10), mass=0.3, grow=0).sum() == 3


def test_an_all_zero_heatmap_gives_no_region():
    assert not region_from_heatmap(np.zeros((7, 7)), (20, 30)).any()
    assert region_from_heatmap(np.zeros((7, 7)), (20, 30)).shape == (20, 30)
    assert not region_from_heatmap(np.full((3, 3), -1.0), (9, 9)).any()  # negatives count as 0


def test_non_square_sizes_map_pixels_to_cells_by_floor():
    rng = np.random.default_rng(3)
    hm = rng.random((3, 5))
    H, W = 10, 7
    cells = region_from_heatmap(hm, (3, 5), mass=0.6, grow=0)  # at cell resolution
    assert cells.shape == (3, 5)
    region = region_from_heatmap(hm, (H, W), mass=0.6, grow=0)
    assert region.shape == (H, W)
    for y in range(H):
        for x in range(W):
            assert region[y, x] == cells[y * 3 // H, x * 5 // W]
    # the smallest set: dropping its coldest cell leaves less than the mass
    picked = np.sort(hm[cells])[::-1]
    assert picked.sum() >= 0.6 * hm.sum() > picked[:-1].sum()


def test_region_arguments_are_checked():
    with pytest.raises(BiasscopeError, match="mass"):
        region_from_heatmap(np.ones((2, 2)), (4, 4), mass=0.0)
    with pytest.raises(BiasscopeError, match="2-D"):
        region_from_heatmap(np.ones(4), (4, 4))
    with pytest.raises(BiasscopeError, match="grow"):
        region_from_heatmap(np.ones((2, 2)), (4, 4), grow=-1)


# --- occlude ------------------------------------------------------------------------------------


def _images_and_regions(seed=0, B=3, H=12, W=10):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (B, H, W, 3)).astype(np.float32)
    regions = np.zeros((B, H, W), bool)
    regions[0, 2:6, 3:8] = True
    regions[1, :, :4] = True
    regions[2, 5, 5] = True
    return images, regions


def test_mean_fill_is_the_mean_colour_outside_the_region():
    images, regions = _images_and_regions()
    out = occlude(images, regions, fill="mean").numpy()
    for i in range(len(images)):
        want = images[i][~regions[i]].mean(axis=0)
        inside = out[i][regions[i]]
        np.testing.assert_allclose(inside, np.broadcast_to(want, inside.shape), rtol=1e-5)
        np.testing.assert_array_equal(out[i][~regions[i]], images[i][~regions[i]])


def test_a_full_region_becomes_mid_grey():
    images, _ = _images_and_regions()
    full = np.ones(images.shape[:3], bool)
    for fill in ("mean", "blur"):
        np.testing.assert_allclose(occlude(images, full, fill=fill).numpy(), 127.5)


def test_blur_fill_is_a_blur_of_the_surroundings_only():
    images, regions = _images_and_regions()
    out = occlude(images, regions, fill="blur").numpy()
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(out[~regions], images[~regions])
    assert not np.allclose(out[regions], images[regions])
    # normalised convolution: the region's own pixels do not leak into the fill
    flat = np.full((1, 16, 16, 3), 50.0, np.float32)
    hole = np.zeros((1, 16, 16), bool)
    hole[0, 4:12, 4:12] = True
    flat[0][hole[0]] = 255.0
    np.testing.assert_allclose(occlude(flat, hole, fill="blur").numpy(), 50.0, atol=1e-3)


def test_blur_falls_back_to_the_mean_colour_far_from_any_kept_pixel():
    # 64 px: sigma 8, the kernel reaches 24 px; rows >= 28 see no kept pixel at all
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    region = np.zeros((1, 64, 64), bool)
    region[0, 4:] = True
    out = occlude(img, region, fill="blur").numpy()
    mean = img[0, :4].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(out[0, 28:], np.broadcast_to(mean, out[0, 28:].shape), rtol=1e-5)
    assert np.isfinite(out).all()


def test_occlude_rejects_an_unknown_fill():
    images, regions = _images_and_regions()
    with pytest.raises(BiasscopeError, match="fill"):
        occlude(images, regions, fill="noise")


# --- run_occlusion on the corner model ----------------------------------------------------------


def test_hiding_the_watermark_flips_and_hiding_elsewhere_does_not(result):
    t = result["tests"]
    assert result["fill"] == "mean" and result["n_pairs"] == 6 + 6 + 5 + 6
    c = t["corner"]
    np.testing.assert_array_equal(c["rows"], np.arange(6))
    assert c["rows"].dtype == np.int64 and c["orig_pred"].dtype == np.int64
    assert c["n"] == 6 and c["n_unreadable"] == 0
    assert (c["orig_pred"] == 0).all() and (c["occluded_pred"] == 2).all()
    assert c["changed_rate"] == 1.0 and c["moved_to"] == {"2": 6}
    assert c["region_share"] == pytest.approx(16 / 256)
    e = t["elsewhere"]
    assert e["changed_rate"] == 0.0 and e["moved_to"] == {}
    assert (e["orig_pred"] == 0).all() and (e["occluded_pred"] == 0).all()
    p = t["corner_plain"]
    assert p["changed_rate"] == 0.0 and (p["orig_pred"] == 2).all() and p["n"] == 5


def test_repeated_rows_are_each_their_own_pair(result):
    r = result["tests"]["repeat"]
    np.testing.assert_array_equal(r["rows"], [0, 0, 7, 1, 0, 7])
    np.testing.assert_array_equal(r["orig_pred"], [0, 0, 2, 0, 0, 2])
    np.testing.assert_array_equal(r["occluded_pred"], [2, 2, 2, 2, 2, 2])
    assert r["changed_rate"] == pytest.approx(4 / 6) and r["moved_to"] == {"2": 4}


def test_one_trace_and_the_same_answer_for_any_batch_size(model, data, corner_region, result):
    assert result["traces"] == 1  # 23 pairs: the last batch is padded, not retraced
    other = run_occlusion(model, data, _tests(corner_region),
                          batch_size=20 - result["batch_size"], **RUN)
    assert other["traces"] == 1
    for tid, t in result["tests"].items():
        for key in ("rows", "orig_pred", "occluded_pred"):
            np.testing.assert_array_equal(t[key], other["tests"][tid][key])
        assert t["changed_rate"] == other["tests"][tid]["changed_rate"]
    json.dumps(to_jsonable(result), allow_nan=False)


def test_blur_fill_flips_the_watermark_too(model, data):
    r = run_occlusion(model, data, [{"id": "corner", "rows": np.arange(6), "region": CORNER},
                                    {"id": "elsewhere", "rows": np.arange(6), "region": ELSEWHERE}],
                      batch_size=8, fill="blur", **RUN)
    assert r["fill"] == "blur"
    assert r["tests"]["corner"]["changed_rate"] == 1.0
    assert r["tests"]["corner"]["moved_to"] == {"2": 6}
    assert r["tests"]["elsewhere"]["changed_rate"] == 0.0


def test_preprocessing_comes_after_the_occlusion(data):
    # the model expects 0..1 inputs; a full region filled with 127.5 (raw) reads as m = 127.5
    # < 150 -> output 2; grey applied after scaling would read as 127.5 * 255 -> output 0
    model = corner_model(scale=1 / 255.0)
    full = np.ones((S, S), bool)
    r = run_occlusion(model, data, [{"id": "full", "rows": np.arange(6), "region": full}],
                      batch_size=4, preprocess="scale01", **RUN)
    t = r["tests"]["full"]
    assert (t["orig_pred"] == 0).all() and (t["occluded_pred"] == 2).all()


def test_empty_tests_build_nothing(model, data):
    r = run_occlusion(model, data, [], batch_size=4, **RUN)
    assert r["tests"] == {} and r["n_pairs"] == 0 and r["traces"] == 0 and r["fill"] == "mean"
    r = run_occlusion(model, data, [{"id": "none", "rows": np.array([], np.int64),
                                     "region": CORNER}], batch_size=4, **RUN)
    t = r["tests"]["none"]
    assert t["n"] == 0 and t["changed_rate"] is None and t["moved_to"] == {} and r["traces"] == 0


def test_tests_are_checked(model, data):
    with pytest.raises(BiasscopeError, match="input size"):
        run_occlusion(model, data, [{"id": "a", "rows": [0], "region": np.ones((4, 4), bool)}],
                      batch_size=4, **RUN)
    with pytest.raises(BiasscopeError, match="0..10"):
        run_occlusion(model, data, [{"id": "a", "rows": [11], "region": CORNER}], batch_size=4,
                      **RUN)
    with pytest.raises(BiasscopeError, match="twice"):
        run_occlusion(model, data, [{"id": "a", "rows": [0], "region": CORNER}] * 2, batch_size=4,
                      **RUN)
    with pytest.raises(BiasscopeError, match="fill"):
        run_occlusion(model, data, [], batch_size=4, fill="grey", **RUN)


# --- run_occlusion on image files ---------------------------------------------------------------


def test_files_unreadable_rows_are_dropped_and_counted(tmp_path, model):
    from conftest import make_image_set
    from PIL import Image

    root = make_image_set(tmp_path / "data", n_per_class=3, size=S)
    ds = load_dataset(root, n_outputs=3)
    for f, label in zip(ds.table["file"], ds.table["label"]):
        img = np.asarray(Image.open(f)).copy()
        img[:K, :K] = 230 if label == "circle" else 0  # circles carry the watermark
        Image.fromarray(img).save(f)
    circles = np.flatnonzero(ds.table["label"].to_numpy() == "circle")
    others = np.flatnonzero(ds.table["label"].to_numpy() != "circle")
    bad = int(circles[1])
    with open(ds.table["file"][bad], "wb") as fh:
        fh.write(b"not an image")
    r = run_occlusion(model, ds, [{"id": "corner", "rows": circles, "region": CORNER},
                                  {"id": "others", "rows": others, "region": CORNER}],
                      batch_size=4, **RUN)
    c = r["tests"]["corner"]
    np.testing.assert_array_equal(c["rows"], np.delete(circles, 1))
    assert c["n"] == 2 and c["n_unreadable"] == 1
    assert c["changed_rate"] == 1.0 and c["moved_to"] == {"2": 2}
    o = r["tests"]["others"]
    assert o["n"] == 6 and o["n_unreadable"] == 0 and o["changed_rate"] == 0.0
    assert r["traces"] == 1


def test_predictions_match_the_model_called_directly(tmp_path):
    """A real (random) CNN, sigmoid and softmax heads: orig_pred and occluded_pred are what the
    model says about the image and about ``occlude`` of it."""
    from conftest import make_cnn, make_image_set
    from PIL import Image

    root = make_image_set(tmp_path / "data", n_per_class=2, size=32)
    ds = load_dataset(root)
    images = np.stack([np.asarray(Image.open(f), np.float32) for f in ds.table["file"]])
    hm = np.zeros((8, 8))
    hm[2, 5], hm[6, 1] = 2.0, 1.0
    region = region_from_heatmap(hm, (32, 32), mass=0.9, grow=1)
    rows = np.array([5, 0, 3, 3, 1])
    for n_out, act in ((3, "softmax"), (1, "sigmoid")):
        m = make_cnn(n_classes=n_out, activation=act, seed=1)
        if n_out == 1:
            ds1 = load_dataset(root, class_map={"circle": 0, "square": 1, "stripe": 1})
        else:
            ds1 = ds
        r = run_occlusion(m, ds1, [{"id": "t", "rows": rows, "region": region}],
                          image_size=(32, 32), channels=3, batch_size=4, fill="blur",
                          progress=False)
        t = r["tests"]["t"]
        x = images[rows]
        occ = occlude(x, np.broadcast_to(region, x.shape[:3]), fill="blur").numpy()
        for got, inp in ((t["orig_pred"], x), (t["occluded_pred"], occ)):
            out = np.asarray(m(inp, training=False))
            if n_out == 1:
                want, margin = (out[:, 0] > 0.5).astype(int), np.abs(out[:, 0] - 0.5)
            else:
                srt = np.sort(out, axis=1)
                want, margin = out.argmax(axis=1), srt[:, -1] - srt[:, -2]
            sure = margin > 1e-5
            np.testing.assert_array_equal(got[sure], want[sure])
        assert r["traces"] == 1
