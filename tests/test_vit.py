"""Token models: functional ViTs and keras-hub classifiers (random weights), layer choice, the seed
recipe on a token layer, and one-line errors for token layers that cannot work."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from typer.testing import CliRunner

import biasscope
from biasscope.cams import make_cam
from biasscope.cli import app
from biasscope.model import choose_layer, find_layer, output_head, target_layers, token_grid
from conftest import make_vit

from test_cams import _maxnorm
from test_cli import _one_line_error

runner = CliRunner()


def _hub_vit(size=32, patch=8):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    bb = keras_hub.models.ViTBackbone(image_shape=(size, size, 3), patch_size=patch, num_layers=2,
                                      num_heads=2, hidden_dim=16, mlp_dim=32, use_class_token=True)
    return keras_hub.models.ViTImageClassifier(backbone=bb, num_classes=3, preprocessor=None)


def test_token_grid_drops_extra_tokens_and_follows_the_patch_grid():
    assert token_grid(197, (224, 224)) == (1, 14, 14)          # CLS
    assert token_grid(198, (224, 224)) == (2, 14, 14)          # CLS + distillation
    assert token_grid(196 + 5, (224, 224)) == (5, 14, 14)      # CLS + 4 registers
    assert token_grid(24, (96, 64)) == (0, 6, 4)               # the image's aspect ratio
    assert token_grid(21, (64, 64), grid_hint=(4, 5)) == (1, 4, 5)
    assert token_grid(35, (64, 64)) is None                    # 35 - e is never a square, e <= 8


def test_functional_vit_lists_token_layers_and_picks_the_last_block():
    model = make_vit()
    cands = target_layers(model)
    by_path = {i.path: i for i in cands}
    assert by_path["patch_embed"].shape == (4, 4, 16) and not by_path["patch_embed"].is_tokens
    assert by_path["block2_out"].describe() == "16 tokens = 4x4 grid, D 16"
    assert by_path["block2_out"].patch == (8, 8) and by_path["block2_out"].patch_layer == "patch_embed"
    assert by_path["final_ln"].trivial and not by_path["block2_out"].trivial
    # the last block's output, not the patch embedding (where the old rule stopped), not the norm
    assert choose_layer(model, cands).path == "block2_out"


def test_functional_vit_gradcam_equals_seed_recipe_on_the_token_layer():
    model = make_vit(seed=4)
    head = model.get_layer("head")
    head.kernel.assign(head.kernel * 20.0)  # distinguishable classes
    target = choose_layer(model)
    eng = make_cam("gradcam", model, target, output_head(model), batch_size=4, input_shape=(32, 32, 3))
    x = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype("float32")
    labels = np.array([0, 1, 2, 1], np.int32)
    out = eng(x, labels)
    assert out["cam_pred"].shape == (4, 4, 4)
    # the seed article's recipe, with the (1, T, D) token output reshaped to its 4x4 grid
    head.activation = None
    try:
        grad_model = keras.Model(model.inputs, [model.get_layer("block2_out").output, model.output])
        for i in range(4):
            for key, cls in (("cam_pred", None), ("cam_true", int(labels[i]))):
                with tf.GradientTape() as tape:
                    tokens, preds = grad_model(x[i:i + 1])
                    c = int(tf.argmax(preds[0])) if cls is None else cls
                    class_channel = preds[:, c]
                grads = tf.reshape(tape.gradient(class_channel, tokens), (1, 4, 4, 16))
                conv = tf.reshape(tokens, (1, 4, 4, 16))[0]
                pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
                heat = tf.squeeze(conv @ pooled[..., tf.newaxis])
                heat = (tf.maximum(heat, 0) / tf.math.reduce_max(heat)).numpy()
                np.testing.assert_allclose(_maxnorm(out[key][i]), heat, atol=1e-4)
    finally:
        head.activation = keras.activations.softmax


@pytest.mark.slow
def test_functional_vit_scans_to_patch_grid_heatmaps(image_set, tmp_path):
    path = tmp_path / "vit.keras"
    make_vit(seed=1).save(path)
    s = biasscope.scan(path, image_set, out=tmp_path / "o", batch_size=6, progress=False,
                       counterfactuals=False)
    assert s.meta["layer"] == "block2_out" and s.meta["layer_shape"] == [4, 4, 16]
    assert s.meta["layer_output"] == "16 tokens = 4x4 grid, D 16"
    hm = np.asarray(s.heatmaps, np.float32)
    assert hm.shape == (18, 4, 4)
    assert (hm.max(axis=(1, 2)) > 0).all() and np.isfinite(s.table["inside_frac"]).all()


@pytest.mark.slow
def test_keras_hub_vit_cls_head_scans_at_the_input_of_the_last_block(image_set, tmp_path):
    model = _hub_vit()
    path = tmp_path / "hub_vit.keras"
    model.save(path)
    cands = target_layers(model)
    last = [i for i in cands if i.path.endswith("transformer_block_2")][0]
    assert last.describe() == "17 tokens = 1 extra + 4x4 grid, D 16"
    s = biasscope.scan(path, image_set, out=tmp_path / "o", batch_size=6, preprocess="scale01",
                       progress=False, counterfactuals=False)
    # the head reads the CLS token: the last block's patch tokens get no gradient, so the
    # target is the last block's input, inside keras-hub's ViTEncoder layer
    assert s.meta["layer"] == f"{model.backbone.name}/vit_encoder/transformer_block_1"
    hm = np.asarray(s.heatmaps, np.float32)
    assert hm.shape == (18, 4, 4) and (hm.max(axis=(1, 2)) > 0).all()
    assert s.meta["timings"]["traces"] == 1
    r = runner.invoke(app, ["layers", str(path)])
    assert r.exit_code == 0, r.output
    auto = next(ln for ln in r.output.splitlines() if "auto" in ln)
    assert f"{model.backbone.name}/vit_encoder/transformer_block_1" in auto and "17 tokens" in auto


def _hub_cnns():
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    resnet = keras_hub.models.ResNetImageClassifier(
        backbone=keras_hub.models.ResNetBackbone(
            input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
            stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
            image_shape=(32, 32, 3)),
        num_classes=3, preprocessor=None)
    densenet = keras_hub.models.DenseNetImageClassifier(
        backbone=keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=8,
                                                   image_shape=(32, 32, 3)),
        num_classes=3, preprocessor=None)
    return {"resnet": (resnet, f"{resnet.backbone.name}/stack1_block0_out"),
            "densenet": (densenet, f"{densenet.backbone.name}/relu")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_keras_hub_cnn_classifiers_load_and_scan(name, image_set, tmp_path):
    model, layer = _hub_cnns()[name]
    path = tmp_path / f"{name}.keras"
    model.save(path)
    s = biasscope.scan(path, image_set, out=tmp_path / "o", batch_size=6, preprocess="scale01",
                       progress=False, counterfactuals=False)
    assert s.meta["layer"] == layer
    hm = np.asarray(s.heatmaps, np.float32)
    assert hm.shape[1:] == (4, 4) and np.isfinite(hm).all() and (hm.max(axis=(1, 2)) > 0).any()


def test_token_layer_that_is_not_a_grid_is_a_one_line_error(image_set, tmp_path):
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 8, strides=8, name="patch_embed")(inp)
    x = keras.layers.Reshape((-1, 16))(x)
    x = keras.layers.Permute((2, 1))(x)
    x = keras.layers.Dense(35)(x)  # 35 tokens: never a square after dropping <= 8
    x = keras.layers.Permute((2, 1), name="odd_tokens")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    path = tmp_path / "odd.keras"
    model.save(path)
    r = runner.invoke(app, ["scan", str(path), str(image_set), "--out", str(tmp_path / "o"),
                            "--layer", "odd_tokens"])
    _one_line_error(r, "'odd_tokens'", "35 tokens", "32x32", "8 extra")
    assert not (tmp_path / "o" / "meta.json").exists()


def test_image_size_not_dividing_by_the_patch_is_a_one_line_error(image_set, tmp_path):
    path = tmp_path / "vit_any.keras"
    make_vit(size=None).save(path)
    r = runner.invoke(app, ["scan", str(path), str(image_set), "--out", str(tmp_path / "o"),
                            "--image-size", "36", "36"])
    _one_line_error(r, "--image-size 36 36", "patch size 8x8", "'patch_embed'", "36 = 4 x 8 + 4")
    ok = runner.invoke(app, ["layers", str(path), "--image-size", "32", "32"])
    assert ok.exit_code == 0 and "block2_out" in ok.output


def test_gradient_method_on_patch_tokens_the_scores_ignore_is_a_one_line_error(image_set, tmp_path):
    path = tmp_path / "hub_vit.keras"
    model = _hub_vit()
    model.save(path)
    layer = f"{model.backbone.name}/vit_encoder/transformer_block_2"
    base = ["scan", str(path), str(image_set), "--out", str(tmp_path / "o"), "--layer", layer,
            "--preprocess", "scale01", "--no-counterfactuals", "--no-report", "--limit", "3"]
    _one_line_error(runner.invoke(app, [*base, "--method", "layercam"]),
                    repr(layer), "do not depend", "16 patch tokens", "--method layercam")
    assert not (tmp_path / "o" / "meta.json").exists()
    # Eigen-CAM needs no gradient: the same layer scans
    r = runner.invoke(app, [*base, "--method", "eigencam"])
    assert r.exit_code == 0, r.output


def test_layer_path_reaches_sublayers_of_composite_layers():
    model = _hub_vit()
    info = find_layer(model, f"{model.backbone.name}/vit_encoder/transformer_block_2/mlp")
    assert info.is_tokens and info.shape == (4, 4, 16)
    with pytest.raises(biasscope.BiasscopeError, match="ambiguous"):
        find_layer(model, "ln_1")  # one in every block
