"""`scan` on every keras.applications architecture (weights=None), bare and as a nested transfer
model, and every gradient CAM method on the same target layer (bare: all nine; nested: see
NESTED_METHOD_CHECK)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import biasscope
from biasscope.cams import METHODS, BaseCAM
from biasscope.model import Capture, find_layer, output_head

import test_methods
from test_methods import _maxnorm

GRADIENT_METHODS = [name for name, cls in METHODS.items() if cls.needs_gradients]

ARCHS = {  # name -> input size giving a final feature map larger than 1x1
    "Xception": 96, "ResNet50": 64, "MobileNetV2": 64, "MobileNetV3Small": 64, "EfficientNetB0": 64,
    "DenseNet121": 64, "InceptionV3": 139, "VGG16": 64, "ConvNeXtTiny": 64,
}
# The nested variant checks every method's formula on two common transfer bases only: the maps
# come from the same capture as the bare model's (checked on all nine), and the nested capture
# itself is checked against a hand-written Grad-CAM in tests/test_cams.py.
NESTED_METHOD_CHECK = {"MobileNetV2", "ResNet50"}
EXPECTED_LAYER = {  # the conventional Grad-CAM layer of each architecture
    "Xception": "block14_sepconv2_act", "ResNet50": "conv5_block3_out", "MobileNetV2": "out_relu",
    "EfficientNetB0": "top_activation", "DenseNet121": "relu", "InceptionV3": "mixed10",
    "VGG16": "block5_pool",
}


class _AllGradientMethods(BaseCAM):
    """Every gradient method's map from one trace: the same A and gradients go through each
    method's own override. Test-only, so that 9 architectures x 2 x 5 methods cost 18 traces."""

    name = "all-gradient-methods"

    def get_cam_image(self, activations, grads, ctx):
        maps = []
        for name in GRADIENT_METHODS:
            cls = METHODS[name]
            if cls.get_cam_image is BaseCAM.get_cam_image:
                w = cls.get_cam_weights(self, activations, grads, ctx)
                maps.append(tf.einsum("bhwk,bk->bhw", activations, w))
            else:
                maps.append(cls.get_cam_image(self, activations, grads, ctx))
        return tf.stack(maps, axis=1)


def _eager_activations_and_grads(model, info, head, x, classes):
    """A and dz_c/dA per image, run eagerly (no tf.function), for the numpy references."""
    with tf.GradientTape(persistent=True) as tape:
        with Capture(info, head, tape) as cap:
            model(x, training=False)
        score = tf.reduce_sum(tf.gather(cap.scores, classes, batch_dims=1))
    g = cap.as_grid(tape.gradient(score, cap.raw))
    return cap.activations.numpy().astype(np.float64), g.numpy().astype(np.float64)


def _check_methods(model, layer, size):
    """The compiled, batched maps of every gradient method equal its per-image numpy formula
    (tests/test_methods.py) on this architecture's own target layer."""
    info, head = find_layer(model, layer), output_head(model)
    eng = _AllGradientMethods(model, info, head, batch_size=4, input_shape=(size, size, 3))
    x = (np.random.default_rng(0).random((4, size, size, 3)) * 255).astype("float32")
    labels = np.array([0, 1, 2, 0], np.int32)
    out = eng(x, labels)
    n_nonzero = 0
    for key, classes in (("cam_pred", out["pred_idx"]), ("cam_true", labels)):
        maps = out[key]
        assert maps.shape[:2] == (4, len(GRADIENT_METHODS)) and maps.shape[2] > 1
        assert np.isfinite(maps).all() and (maps >= 0).all()
        A, g = _eager_activations_and_grads(model, info, head, x, classes.astype(np.int32))
        for j, name in enumerate(GRADIENT_METHODS):
            ref = getattr(test_methods, f"_ref_{name}")
            for i in range(4):
                want = ref(A[i], g[i])
                if name == "xgradcam" and A[i].min() < 0:
                    # XGrad-CAM divides by sum_ij A_k, near 0 for a channel of mixed sign (swish
                    # in EfficientNetB0, hard-swish in MobileNetV3): float32 rounding is then
                    # amplified without bound (1e-2 seen). Its 1e-4 proof is on ReLU layers
                    # (tests/test_methods.py); here it is only checked finite and >= 0 above.
                    continue
                # random weights can zero one class's map everywhere; then both must be zero
                np.testing.assert_allclose(_maxnorm(maps[i, j]), _maxnorm(want), atol=1e-3,
                                           err_msg=f"{name}, {key}, image {i}")
                n_nonzero += want.max() > 0
    assert n_nonzero > 0


def _check(scan, n_images, size):
    assert len(scan.table) == n_images
    h, w = scan.heatmaps.shape[1:]
    assert h > 1 and w > 1 and h <= size // 8
    assert scan.meta["timings"]["traces"] == 1
    assert np.isfinite(scan.table["confidence"]).all()
    inside = scan.table["inside_frac"].to_numpy()
    all_zero = scan.table["cam_max"].to_numpy() == 0
    np.testing.assert_array_equal(np.asarray(scan.heatmaps).max(axis=(1, 2)), np.where(all_zero, 0, 1))
    # random weights can give an all-zero CAM; exactly those rows have no inside_frac
    np.testing.assert_array_equal(np.isnan(inside), all_zero)
    assert ((inside[~all_zero] >= 0) & (inside[~all_zero] <= 1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bare_architecture(arch, image_set, tmp_path):
    keras.utils.set_random_seed(0)
    size = ARCHS[arch]
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3), classes=3)
    s = biasscope.scan(model, image_set, out=tmp_path / "o", batch_size=6, limit=6, progress=False)
    if arch in EXPECTED_LAYER:
        assert s.meta["layer"] == EXPECTED_LAYER[arch]
    _check(s, 6, size)
    _check_methods(model, s.meta["layer"], size)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_nested_transfer_architecture(arch, image_set, tmp_path):
    keras.utils.set_random_seed(0)
    size = ARCHS[arch]
    base = getattr(keras.applications, arch)(weights=None, include_top=False, input_shape=(size, size, 3))
    model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    path = tmp_path / "transfer.keras"
    model.save(path)
    s = biasscope.scan(path, image_set, out=tmp_path / "o", batch_size=6, limit=6, progress=False)
    assert s.meta["layer"].startswith(base.name + "/")
    if arch in EXPECTED_LAYER:
        assert s.meta["layer"] == f"{base.name}/{EXPECTED_LAYER[arch]}"
    _check(s, 6, size)
    if arch in NESTED_METHOD_CHECK:
        _check_methods(model, s.meta["layer"], size)
