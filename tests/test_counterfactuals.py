"""Counterfactual background tests on hand-built data with hand-built models of known behaviour.

The images: class k's background is a flat colour in the red/green channels only, its object
a 4x4 square whose blue channel encodes the class. Two Keras models with hand-set weights:

* ``background_model`` reads the mean red/green colour (global average pooling): it predicts
  purely from the background;
* ``object_model`` reads the maximum blue value (global max pooling): it predicts purely from
  the object, and answers the extra output 3 ("nothing") when there is no object.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from biasscope.counterfactuals import (  # noqa: E402
    fill_background, only_foreground, paste_objects, run_counterfactuals)
from biasscope.data import load_dataset  # noqa: E402

S = 16
BG = {0: (200, 0), 1: (0, 200), 2: (200, 200)}       # red, green per class
OBJ_BLUE = {0: 50, 1: 150, 2: 250}                   # blue of the object per class
RUN = dict(image_size=(S, S), channels=3, batch_size=8, n_boot=200, progress=False)


def make_data(n_per_class=10, seed=0, empty_masks=0):
    rng = np.random.default_rng(seed)
    images, labels, masks = [], [], []
    for k in range(3):
        for _ in range(n_per_class):
            img = np.zeros((S, S, 3), np.uint8)
            img[..., 0], img[..., 1] = BG[k]
            y, x = rng.integers(1, S - 5, 2)
            m = np.zeros((S, S), bool)
            m[y:y + 4, x:x + 4] = True
            img[m] = (0, 0, OBJ_BLUE[k])
            images.append(img), labels.append(k), masks.append(m)
    masks = np.stack(masks)
    masks[:empty_masks] = False  # rows "without a mask"
    return np.stack(images), np.array(labels), masks


def _dense_model(pool, kernel, bias):
    inp = keras.Input((S, S, 3))
    x = pool()(inp)
    out = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inp, out)
    model.get_layer("head").set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
    return model


@pytest.fixture(scope="module")
def background_model():
    # logits from the mean (R, G): class 0 = R - G, class 1 = G - R, class 2 = R + G - 250;
    # output 3 never wins. Objects (R = G = 0, ~6% of the image) do not change the argmax.
    kernel = [[1, -1, 1, 0], [-1, 1, 1, 0], [0, 0, 0, 0]]
    return _dense_model(keras.layers.GlobalAveragePooling2D, kernel, [0, 0, -250, -1000])


@pytest.fixture(scope="module")
def object_model():
    # logits from v = max blue: upper envelope of 0, v-25, 2v-125, 3v-325 gives
    # v < 25 -> 3 ("nothing"), 25..100 -> 0, 100..200 -> 1, > 200 -> 2
    kernel = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 0]]
    return _dense_model(keras.layers.GlobalMaxPooling2D, kernel, [-25, -125, -325, 0])


@pytest.fixture(scope="module")
def data():
    return load_dataset(make_data(), n_outputs=4)


@pytest.fixture(scope="module")
def bg_result(background_model, data):
    return run_counterfactuals(background_model, data, seed=0, **RUN)


@pytest.fixture(scope="module")
def obj_result(object_model, data):
    return run_counterfactuals(object_model, data, seed=0, **RUN)


# --- the images ---------------------------------------------------------------------------------


def test_only_bg_removes_the_object_and_takes_the_surrounding_colour():
    images, _, masks = make_data(n_per_class=2)
    out = fill_background(images.astype(np.float32), masks, dilate=2).numpy()
    assert out.shape == images.shape
    assert np.all(out[..., 2] < 1e-3)  # no blue (object) pixel survives
    flat = images.astype(np.float32).copy()
    flat[masks] = out[masks]
    for i in range(len(images)):
        bg = images[i][~masks[i]][0].astype(np.float32)
        np.testing.assert_allclose(out[i][masks[i]], np.broadcast_to(bg, out[i][masks[i]].shape), atol=0.5)
    # outside the dilated mask the image is untouched
    far = ~tf.nn.max_pool2d(masks[..., None].astype(np.float32), 5, 1, "SAME").numpy()[..., 0].astype(bool)
    np.testing.assert_array_equal(out[far], images.astype(np.float32)[far])


def test_only_bg_fill_follows_a_gradient_and_keeps_texture():
    # background: a horizontal ramp plus fine noise; the hole must take the local level
    rng = np.random.default_rng(1)
    ramp = np.tile(np.linspace(0, 240, 32, dtype=np.float32), (32, 1))
    img = np.repeat((ramp + rng.normal(0, 4, (32, 32)))[None, ..., None], 3, axis=-1).astype(np.float32)
    mask = np.zeros((1, 32, 32), bool)
    mask[0, 10:20, 12:18] = True
    img[0][mask[0]] = 255.0
    out = fill_background(img, mask, dilate=1).numpy()[0]
    inside = out[10:20, 12:18, 0]
    np.testing.assert_allclose(inside.mean(axis=0), ramp[0, 12:18], atol=15)
    assert inside.std(axis=0).mean() > 1.0  # texture, not a flat ghost of the object's outline


@pytest.mark.parametrize("shape", [(6, 24, 24), (4, 37, 53), (3, 8, 8)])
def test_texture_sources_are_the_first_background_shift_of_all(shape):
    # large, ragged holes, so that many hole pixels are served by none of the first shifts
    # tried and need the full list; one image all hole (no source), one without a hole
    from biasscope.counterfactuals import _FIRST_SHIFTS, _shift_sources, _texture_sources

    B, H, W = shape
    rng = np.random.default_rng(B * H * W)
    yy, xx = np.mgrid[:H, :W]
    hole = np.zeros(shape, bool)
    for i in range(B):
        r = rng.uniform(0.3, 0.7) * max(H, W)
        hole[i] = ((yy - rng.uniform(0, H)) ** 2 + (xx - rng.uniform(0, W)) ** 2 < r * r) | (rng.random((H, W)) < 0.4)
    hole[0], hole[1] = True, False
    flat = hole.reshape(-1)
    at = np.flatnonzero(flat)
    src = _shift_sources(H, W)[at % (H * W)] + (at // (H * W) * (H * W))[:, None]  # every shift
    bg = ~flat[src]
    assert (bg.any(axis=1) & ~bg[:, :_FIRST_SHIFTS].any(axis=1)).any()  # the full list is needed
    pix, found = _texture_sources(tf.constant(flat), tf.constant(at, tf.int32), H, W)
    np.testing.assert_array_equal(found.numpy(), bg.any(axis=1))
    np.testing.assert_array_equal(pix.numpy(), src[np.arange(len(at)), bg.argmax(axis=1)])


def test_a_fully_masked_image_is_filled_with_grey():
    img = np.full((1, 8, 8, 3), 30.0, np.float32)
    out = fill_background(img, np.ones((1, 8, 8), bool)).numpy()
    np.testing.assert_allclose(out, 127.5)


def test_mixed_rand_pastes_exactly_the_mask_pixels():
    images, _, masks = make_data(n_per_class=2)
    rng = np.random.default_rng(0)
    backgrounds = rng.uniform(0, 255, images.shape).astype(np.float32)
    source = rng.permutation(len(images)).astype(np.int32)
    out = paste_objects(images.astype(np.float32), masks, backgrounds, source).numpy()
    for i in range(len(images)):
        np.testing.assert_array_equal(out[i][masks[i]], images[i][masks[i]])
        np.testing.assert_array_equal(out[i][~masks[i]], backgrounds[source[i]][~masks[i]])


# --- the tests on known models ------------------------------------------------------------------


def test_only_fg_keeps_exactly_the_mask_pixels_on_grey():
    images, _, masks = make_data(n_per_class=2)
    fg = only_foreground(tf.constant(images, tf.float32), tf.constant(masks)).numpy()
    np.testing.assert_array_equal(fg[masks], images[masks].astype(np.float32))
    assert (fg[~masks] == 127.5).all()


def test_a_background_model_shows_a_large_gap_and_predicts_from_backgrounds(bg_result):
    assert bg_result["n_with_mask"] == 30 and bg_result["n_images"] == 30
    for c, f in bg_result["classes"].items():
        assert f["n"] == 10 and f["n_mixed"] == 10 and f["chance"] == pytest.approx(0.25)
        assert f["orig_acc"] == 1.0 and f["mixed_rand_acc"] == 0.0
        assert f["bg_gap"] == pytest.approx(1.0) and f["bg_gap_ci"][0] > 0.5
        assert f["only_bg_rate"] == 1.0 and f["only_bg_ci"][0] > f["chance"]
        assert f["only_bg_base"] == 0.0 and f["only_bg_excess_ci"][0] > 0.5
        assert f["transplant_rate"] == 1.0 and f["n_transplant"] > 0
        assert f["flip_rate"] == 1.0


def test_an_object_model_shows_no_gap_and_nothing_on_backgrounds(obj_result):
    for c, f in obj_result["classes"].items():
        assert f["orig_acc"] == 1.0 and f["mixed_rand_acc"] == 1.0
        assert f["bg_gap"] == 0.0 and f["bg_gap_ci"] == [0.0, 0.0]
        assert f["only_bg_rate"] == 0.0 <= f["chance"]
        assert f["transplant_rate"] == 0.0 and f["flip_rate"] == 0.0
    pi = obj_result["per_image"]
    assert set(pi["only_bg_pred"]) == {3}  # "nothing": the object is gone
    np.testing.assert_array_equal(pi["mixed_pred"], pi["label_idx"])


def test_only_fg_accuracy_shows_what_the_object_alone_says(bg_result, obj_result):
    # The background model reads the grey canvas (mean R = G, just under 127.5 with the
    # object's R = G = 0 pixels) as one class, whatever the object: R - G = G - R = 0 beats
    # R + G - 250 < 0, and the tie goes to output 0. The object model reads the object, except
    # class 0's blue (50), which is below the canvas's own blue (127.5) that its max-pooling
    # then sees.
    assert set(bg_result["per_image"]["only_fg_pred"]) == {0}
    assert {c: f["only_fg_acc"] for c, f in bg_result["classes"].items()} == {"0": 1.0, "1": 0.0, "2": 0.0}
    assert {c: f["only_fg_acc"] for c, f in obj_result["classes"].items()} == {"0": 0.0, "1": 1.0, "2": 1.0}
    assert "object_embedding" not in obj_result  # only with a target layer


def test_object_embedding_is_the_target_layers_mean_activation_on_the_object(image_set):
    from conftest import make_cnn

    from biasscope.counterfactuals import _FG_FILL
    from biasscope.model import choose_layer

    model = make_cnn()
    target = choose_layer(model)
    ds = load_dataset(image_set, n_outputs=3)
    r = run_counterfactuals(model, ds, image_size=(32, 32), channels=3, batch_size=4, n_boot=20,
                            target=target, progress=False)
    emb = r.pop("object_embedding")
    json.dumps(r, allow_nan=False)  # the arrays are kept apart from the JSON result
    assert emb["layer"] == target.path == "last_conv"
    assert emb["features"].shape == (18, 16) and emb["features"].dtype == np.float32
    np.testing.assert_array_equal(emb["index"], r["per_image"]["index"])
    # by hand: object pixels on the grey canvas through the model up to the target layer
    from PIL import Image

    t = ds.table.iloc[emb["index"]]
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in t["file"]])
    masks = np.stack([np.asarray(Image.open(p)) > 0 for p in t["mask_file"]])
    fg = np.where(masks[..., None], imgs, _FG_FILL).astype(np.float32)
    upto = keras.Model(model.inputs, target.layer.output)
    expected = upto.predict(fg, verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(emb["features"], expected, rtol=1e-4, atol=1e-5)


def test_pairing_takes_backgrounds_from_other_classes(bg_result):
    pi = bg_result["per_image"]
    label = np.asarray(pi["label_idx"])
    src = np.asarray(pi["bg_source_index_all"])
    assert src.shape == (30, 4) and (src >= 0).all()
    assert (label[src] != label[:, None]).all()  # rows are in dataset order (index = arange)
    assert pi["index"] == list(range(30))
    # the background's class is what a background model answers
    np.testing.assert_array_equal(np.asarray(pi["mixed_pred_all"]), label[src])


def test_result_is_json_and_deterministic_in_the_seed(background_model, data, bg_result):
    json.dumps(bg_result, allow_nan=False)
    again = run_counterfactuals(background_model, data, seed=0, **RUN)
    other = run_counterfactuals(background_model, data, seed=1, **RUN)
    for key in ("classes", "per_image", "method"):
        assert again[key] == bg_result[key]
    assert other["per_image"]["bg_source_index_all"] != bg_result["per_image"]["bg_source_index_all"]


def test_rows_without_masks_are_skipped_and_counted(object_model):
    ds = load_dataset(make_data(empty_masks=4), n_outputs=4)
    r = run_counterfactuals(object_model, ds, draws=1, pairing="class", **RUN)
    assert r["method"]["pairing"] == "class" and set(r["per_image"]["pair_tier"]) == {2}
    assert r["n_with_mask"] == 26 and r["n_skipped"]["no_mask"] == 4
    assert r["classes"]["0"]["n"] == 6
    assert 0 not in r["per_image"]["index"]
    assert np.asarray(r["per_image"]["mixed_pred_all"]).shape == (26, 1)


def test_no_masks_returns_skipped(object_model):
    images, labels, _ = make_data(n_per_class=2)
    ds = load_dataset((images, labels), n_outputs=4)
    assert run_counterfactuals(object_model, ds, **RUN) == {"skipped": "no masks"}


def test_bad_arguments_raise(object_model, data):
    from biasscope.errors import BiasscopeError

    with pytest.raises(BiasscopeError, match="pairing"):
        run_counterfactuals(object_model, data, pairing="nearest", **RUN)
    with pytest.raises(BiasscopeError, match="draws"):
        run_counterfactuals(object_model, data, draws=0, **RUN)


def test_runs_on_image_files_with_mask_files(image_set):
    from conftest import make_cnn

    ds = load_dataset(image_set, n_outputs=3)
    r = run_counterfactuals(make_cnn(), ds, image_size=(32, 32), channels=3, batch_size=4,
                            n_boot=50, progress=False)
    assert r["n_with_mask"] == len(ds) == 18
    assert r["method"]["batch_size"] == 8  # at least 8: the pool backgrounds come from
    assert set(r["classes"]) == {"circle", "square", "stripe"}
    assert all(f["n"] == 6 for f in r["classes"].values())
    assert r["per_image"]["path"][0].startswith("images/")


def test_mixed_rand_runs_on_a_stratified_per_class_sample(object_model):
    import pandas as pd

    from biasscope.counterfactuals import sample_size_for, stratified_sample

    assert sample_size_for(0.03) == 1068
    data = load_dataset(make_data(n_per_class=12), n_outputs=4)
    full = run_counterfactuals(object_model, data, **RUN)
    cut = run_counterfactuals(object_model, data, mixed_per_class=5, **RUN)
    per = {k: np.asarray(v) for k, v in cut["per_image"].items()}
    drawn = per["mixed_pred_all"][:, 0] >= 0
    labels = per["label_idx"]
    # at most 5 objects of each class get draws (every class has 12); the others none at all
    assert all(0 < (drawn & (labels == c)).sum() <= 5 for c in range(3))
    assert (per["pair_tier_all"][~drawn] == -1).all()
    assert cut["method"]["mixed_rand_sample"]["per_class"] == 5
    assert sum(cut["method"]["mixed_rand_sample"]["n_objects_by_class"].values()) == int(drawn.sum())
    # without the scan's predictions Only-BG and Only-FG cover every image, unchanged by the sample
    np.testing.assert_array_equal(cut["per_image"]["only_bg_pred"], full["per_image"]["only_bg_pred"])
    np.testing.assert_array_equal(cut["per_image"]["only_fg_pred"], full["per_image"]["only_fg_pred"])
    first = data.classes[0]
    assert cut["classes"][first]["n_mixed"] <= 5 < full["classes"][first]["n_mixed"]
    # a sample as large as the data, with draws for as many per class, changes nothing
    R = full["method"]["draws"]
    same = run_counterfactuals(object_model, data, mixed_per_class=12 * R, **RUN)
    np.testing.assert_array_equal(same["per_image"]["mixed_pred_all"], full["per_image"]["mixed_pred_all"])
    assert same["classes"] == full["classes"]
    # draws sized for the sample: 12 draws per class -> one per object, on every object
    one = run_counterfactuals(object_model, data, mixed_per_class=12, **RUN)
    m = np.asarray(one["per_image"]["mixed_pred_all"])
    assert (m[:, 0] >= 0).all() and (m[:, 1:] == -1).all()
    assert set(one["method"]["mixed_rand_sample"]["draws_per_object"].values()) == {1}
    assert cut["method"]["mixed_rand_sample"]["draws_per_object"][first] == 1  # round(5 / 5)
    # groups: a class's sample is spread over its attribute values in proportion
    t = pd.DataFrame({"label_idx": [0] * 100, "site": ["a"] * 80 + ["b"] * 20})
    keep = stratified_sample(t, np.arange(100), 10, ["site"], seed=0)
    assert keep.sum() == 10 and keep[80:].sum() == 2


def test_given_the_scans_predictions_only_the_sample_and_the_mistakes_get_only_bg(object_model):
    data = load_dataset(make_data(n_per_class=12), n_outputs=4)
    full = run_counterfactuals(object_model, data, **RUN)
    idx = np.asarray(full["per_image"]["index"])
    pred = np.full(len(data), -1, np.int64)
    pred[idx] = full["per_image"]["orig_pred"]
    # every row sampled: the same result as predicting the originals here
    same = run_counterfactuals(object_model, data, predictions=pred, **RUN)
    assert same["classes"] == full["classes"]
    for k in ("orig_pred", "only_bg_pred", "only_fg_pred", "mixed_pred_all", "bg_source_index_all"):
        np.testing.assert_array_equal(same["per_image"][k], full["per_image"][k])
    assert same["method"]["mixed_rand_sample"]["only_bg_rows"] == "the sample and the mistakes"
    # a sample of 5 per class; two images declared mistakes (whatever the model says) get an
    # Only-BG image although not sampled; the other unsampled ones none
    labels = data.table["label_idx"].to_numpy()
    fake = pred.copy()
    cut0 = run_counterfactuals(object_model, data, mixed_per_class=5, predictions=pred, **RUN)
    outside = idx[~np.asarray(cut0["per_image"]["in_sample"])]
    wrong = outside[:2]
    fake[wrong] = (labels[wrong] + 1) % 3
    cut = run_counterfactuals(object_model, data, mixed_per_class=5, predictions=fake, **RUN)
    pi = {k: np.asarray(v) for k, v in cut["per_image"].items()}
    has = pi["only_bg_pred"] >= 0
    mistake = pi["orig_pred"] != pi["label_idx"]
    np.testing.assert_array_equal(has, pi["in_sample"] | mistake)
    assert set(wrong) <= set(pi["index"][has])
    assert pi["in_sample"].sum() == 15 and has.sum() >= 17
    np.testing.assert_array_equal(pi["orig_pred"], fake[pi["index"]])  # not recomputed
    full_bg = dict(zip(idx.tolist(), full["per_image"]["only_bg_pred"]))
    assert all(full_bg[int(i)] == p for i, p in zip(pi["index"][has], pi["only_bg_pred"][has]))
    # the Only-BG rates are taken on the sample only
    first = data.classes[0]
    assert cut["classes"][first]["n_only_bg"] == 5


def test_chunks_are_whole_batches_with_their_own_rng_and_any_runner_gives_the_same_result(object_model, data):
    """30 rows, 8 a batch, 1 batch a chunk: 4 chunks (the last padded). Chunks run in reverse
    order by another runner (as Ray's actors may finish them) give the local result; the
    pairing RNG is the chunk's own, so the draws do not depend on the chunks before."""
    from biasscope.counterfactuals import CounterfactualSteps, plan_counterfactuals, run_chunk

    base = run_counterfactuals(object_model, data, chunk_batches=1, **RUN)
    assert base["method"]["chunks"]["n"] == 4 and base["method"]["chunks"]["rows"] == 8
    assert base["method"]["engine"] == {"name": "local"}
    calls: list = []

    def backwards(plan, specs, task):
        steps = CounterfactualSteps(object_model, plan)
        got = {}
        for s in reversed(specs):
            calls.append(s["chunk"])
            got[s["chunk"]] = run_chunk(steps, plan, **s)
            task.advance(s["hi"] - s["lo"])
        return got

    backwards.info = {"name": "backwards"}  # type: ignore[attr-defined]
    other = run_counterfactuals(object_model, data, chunk_batches=1, runner=backwards, **RUN)
    assert calls == [3, 2, 1, 0] and other["method"]["engine"] == {"name": "backwards"}
    assert other["per_image"] == base["per_image"] and other["classes"] == base["classes"]
    # one chunk for all: the first batch draws from the same RNG (chunk 0's), the others not
    whole = run_counterfactuals(object_model, data, **RUN)
    assert whole["method"]["chunks"]["n"] == 1
    assert whole["per_image"]["index"] == base["per_image"]["index"] == list(range(30))
    first = plan_counterfactuals(data, **{k: RUN[k] for k in ("image_size", "channels", "batch_size")}).order[:8]
    src_w, src_b = (np.asarray(r["per_image"]["bg_source_index_all"]) for r in (whole, base))
    np.testing.assert_array_equal(src_w[first], src_b[first])
    assert (np.delete(src_w, first, axis=0) != np.delete(src_b, first, axis=0)).any()


def test_one_pipeline_over_many_chunks_gives_each_chunks_own_batches(image_set):
    """The local runner reads all chunks through one pipeline (``chunk_rows``): its batches are
    exactly those of one pipeline per chunk, also when an image in the middle of a chunk cannot
    be decoded (the chunk's batches close up, the next chunk starts on its own batch), and the
    counterfactual result is the same as with a pipeline per chunk."""
    from conftest import make_cnn

    from biasscope.counterfactuals import CounterfactualSteps, run_chunk
    from biasscope.pipeline import make_pipeline

    (image_set / "images" / "square" / "square_002.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    ds = load_dataset(image_set, n_outputs=3)
    geo = dict(image_size=(32, 32), channels=3, batch_size=4)

    def batches(pipe):
        return [{k: v.numpy() for k, v in b.items()} for b in pipe]

    whole = batches(make_pipeline(ds, **geo, start=0, stop=len(ds), chunk_rows=8))
    apart = [b for lo in range(0, len(ds), 8) for b in batches(make_pipeline(ds, **geo, start=lo, stop=lo + 8))]
    # chunks of 8, 7 (index 8 unreadable) and 2 rows: 2 + 2 + 1 batches, the last two padded
    assert len(whole) == len(apart) == 5
    assert whole[3]["index"].tolist() == [13, 14, 15, -1] and whole[4]["index"].tolist() == [16, 17, -1, -1]
    for a, b in zip(whole, apart):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    model = make_cnn()

    def per_chunk(plan, specs, task):
        steps = CounterfactualSteps(model, plan)
        return {s["chunk"]: run_chunk(steps, plan, **s) for s in specs}

    run = dict(image_size=(32, 32), channels=3, batch_size=8, n_boot=50, progress=False, chunk_batches=1)
    local = run_counterfactuals(model, ds, **run)
    other = run_counterfactuals(model, ds, runner=per_chunk, **run)
    assert local["method"]["chunks"]["n"] == 3 and local["n_with_mask"] == 17
    assert local["per_image"] == other["per_image"] and local["classes"] == other["classes"]


def _decoded_copy(ds, size=32):
    """The copy the local CAM pass keeps, filled from the scan's own pipeline (batch 4)."""
    from biasscope.decoded import DecodedInputs
    from biasscope.pipeline import make_pipeline

    keep = DecodedInputs.create(len(ds), size, size, 3)
    for b in make_pipeline(ds, image_size=(size, size), channels=3, batch_size=4):
        idx = b["index"].numpy()
        v = idx >= 0
        keep.put(idx[v], b["image"].numpy()[v], b["mask"].numpy()[v], b["has_mask"].numpy()[v],
                 b["image_hw"].numpy()[v])
    keep.complete = True
    return keep


def test_the_cam_pass_copy_gives_the_pipelines_batches_and_the_same_result(image_set, monkeypatch):
    """Batches built from the CAM pass's decoded copy (:mod:`biasscope.decoded`) are the
    pipeline's, field by field, in any row order, with an unreadable image in a chunk; the
    counterfactual result is the same, and no file is read for it."""
    import dataclasses

    from conftest import make_cnn

    import biasscope.pipeline
    from biasscope.pipeline import make_pipeline

    (image_set / "images" / "square" / "square_002.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    ds = load_dataset(image_set, n_outputs=3)
    keep = _decoded_copy(ds)
    assert keep.usable and keep.stored.sum() == len(ds) - 1
    order = np.random.default_rng(0).permutation(len(ds))
    sub = dataclasses.replace(ds, table=ds.table.iloc[order].reset_index(drop=True))
    want = [{k: v.numpy() for k, v in b.items()}
            for b in make_pipeline(sub, image_size=(32, 32), channels=3, batch_size=4, chunk_rows=8)]
    got = list(keep.batches(order, sub.table["label_idx"].to_numpy(np.int32), batch_size=4, start=0,
                            stop=len(ds), chunk_rows=8))
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        for k in ("index", "label", "image", "mask", "has_mask"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    model = make_cnn()
    run = dict(image_size=(32, 32), channels=3, batch_size=8, n_boot=50, progress=False, chunk_batches=1)
    files = run_counterfactuals(model, ds, **run)

    def no_files(*a, **k):
        raise AssertionError("the counterfactual pass read the files")

    monkeypatch.setattr(biasscope.pipeline, "make_pipeline", no_files)
    copied = run_counterfactuals(model, ds, inputs=keep, **run)
    assert copied["n_with_mask"] == files["n_with_mask"] == 17
    assert copied["per_image"] == files["per_image"] and copied["classes"] == files["classes"]
    # from the copy, the 3 chunks run one after another or several at once: the same result
    import biasscope.counterfactuals as cfm

    monkeypatch.setattr(cfm.os, "cpu_count", lambda: 4)
    for threads in (1, 3):
        monkeypatch.setattr(cfm, "LOCAL_CHUNK_THREADS", threads)
        again = run_counterfactuals(model, ds, inputs=keep, **run)
        assert again["per_image"] == files["per_image"] and again["classes"] == files["classes"], threads


def test_a_resized_image_turns_the_copy_off_and_the_files_are_read(tmp_path):
    """An image not stored at the model's size is resized by the pipeline (its pixels are not
    integers): the copy drops out and the counterfactual pass decodes the files itself."""
    from conftest import make_cnn, make_image_set

    from biasscope.decoded import DecodedInputs

    root = make_image_set(tmp_path / "d", size=40)
    ds = load_dataset(root, n_outputs=3)
    keep = _decoded_copy(ds, size=32)
    assert not keep.ok and not keep.usable and keep.images.size == 0
    model = make_cnn()
    run = dict(image_size=(32, 32), channels=3, batch_size=8, n_boot=50, progress=False)
    assert run_counterfactuals(model, ds, inputs=keep, **run)["per_image"] == \
        run_counterfactuals(model, ds, **run)["per_image"]
    assert DecodedInputs.create(10, 64, 64, 3, budget=10 * 64 * 64 * 3) is None  # masks do not fit


def test_several_pools_per_call_give_the_pools_own_result(object_model, data, monkeypatch):
    """Small images run several pairing pools per compiled call; each pool still draws its
    backgrounds from itself, in the same RNG order: the result equals one pool per call."""
    import biasscope.counterfactuals as cfm

    assert cfm.pools_per_call(16, 64, 64) == 4 and cfm.pools_per_call(16, 224, 224) == 1
    assert cfm.pools_per_call(8, 16, 16) == 8 and cfm.pools_per_call(5, 64, 64) == 8
    assert cfm.pools_per_call(128, 8, 8) == 1
    kw = dict(RUN, draws=3, mixed_per_class=6, predictions=np.zeros(len(data), np.int64), chunk_batches=3)
    many = run_counterfactuals(object_model, data, **kw)
    assert many["method"]["rows_per_call"] == 64 and many["method"]["batch_size"] == 8
    monkeypatch.setattr(cfm, "CALL_ROWS", 8)
    one = run_counterfactuals(object_model, data, **kw)
    assert one["method"]["rows_per_call"] == 8
    assert (np.asarray(one["per_image"]["bg_source_index_all"]) >= 0).sum() > 10
    assert one["per_image"] == many["per_image"] and one["classes"] == many["classes"]


def test_the_mask_dilation_is_the_square_one():
    """The dilation (a max-pool along rows, then columns) equals binary dilation by a
    (2p+1)-square, borders included."""
    from scipy.ndimage import binary_dilation

    from biasscope.counterfactuals import _dilate

    m = np.random.default_rng(0).random((3, 17, 12)) > 0.93
    m[0, 0, 0] = m[1, -1, 5] = True
    for p in (0, 1, 2, 4):
        want = np.stack([binary_dilation(x, np.ones((2 * p + 1,) * 2, bool)) if p else x for x in m])
        np.testing.assert_array_equal(_dilate(tf.constant(m), p).numpy(), want)
