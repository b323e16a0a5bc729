"""The batched Grad-CAM engine against the seed article's per-image recipe and hand-written tapes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from biasscope.bench import reference_gradcam
from biasscope.cams import make_cam
from biasscope.errors import BiasscopeError
from biasscope.model import choose_layer, output_head
from conftest import make_cnn


def _maxnorm(h):
    m = h.max()
    return h / m if m > 0 else h


def _engine(model, batch, size):
    return make_cam("gradcam", model, choose_layer(model), output_head(model), batch_size=batch,
                    input_shape=(size, size, 3))


def _recipe(model, layer_name, x, pred_index=None):
    """The seed recipe needs the softmax removed from the model, as the article does."""
    last = model.layers[-1]
    saved = last.activation
    last.activation = None
    try:
        return reference_gradcam(x, model, layer_name, pred_index=pred_index)
    finally:
        last.activation = saved


@pytest.mark.parametrize("build, size", [
    (lambda: make_cnn(3, 32, seed=1), 32),
    (lambda: keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=5), 64),
])
def test_batched_gradcam_matches_per_image_recipe(build, size):
    model = build()
    eng = _engine(model, 4, size)
    rng = np.random.default_rng(0)
    x = (rng.random((4, size, size, 3)) * 255).astype("float32")
    labels = np.array([0, 1, 2, 1], dtype=np.int32)
    out = eng(x, labels)
    layer = eng.target.path
    for i in range(4):
        ref_pred = _recipe(model, layer, x[i:i + 1])
        ref_true = _recipe(model, layer, x[i:i + 1], pred_index=int(labels[i]))
        np.testing.assert_allclose(_maxnorm(out["cam_pred"][i]), ref_pred, atol=1e-4)
        np.testing.assert_allclose(_maxnorm(out["cam_true"][i]), ref_true, atol=1e-4)
    # predictions are the model's own
    np.testing.assert_array_equal(out["pred_idx"], np.argmax(model(x).numpy(), axis=1))
    np.testing.assert_allclose(out["confidence"], model(x).numpy().max(axis=1), rtol=1e-5)


def test_nested_transfer_model_matches_manual_gradcam():
    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(64, 64, 3))
    gap, dense = keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")
    model = keras.Sequential([keras.Input((64, 64, 3)), base, gap, dense])
    dense.kernel.assign(dense.kernel * 50.0)  # make the classes distinguishable
    eng = _engine(model, 3, 64)
    assert eng.target.path.endswith("/out_relu")
    x = (np.random.default_rng(1).random((3, 64, 64, 3)) * 255).astype("float32")
    labels = np.array([2, 0, 1], dtype=np.int32)
    out = eng(x, labels)
    inner = keras.Model(base.inputs, [base.get_layer("out_relu").output, base.output])
    for i in range(3):
        with tf.GradientTape() as tape:
            A, feat = inner(x[i:i + 1])
            z = tf.matmul(gap(feat), dense.kernel) + dense.bias  # scores before softmax
            score = z[:, labels[i]]
        g = tape.gradient(score, A)
        ref = tf.nn.relu(tf.reduce_sum(A * tf.reduce_mean(g, axis=(1, 2), keepdims=True), -1))[0].numpy()
        np.testing.assert_allclose(_maxnorm(out["cam_true"][i]), _maxnorm(ref), atol=1e-4)


def test_single_sigmoid_unit_gives_plus_and_minus_z():
    model = make_cnn(1, 32, activation="sigmoid", seed=2)
    eng = _engine(model, 2, 32)
    assert eng.n_classes == 2
    x = (np.random.default_rng(2).random((2, 32, 32, 3)) * 255).astype("float32")
    pos = eng(x, np.array([1, 1], np.int32))["cam_true"]
    neg = eng(x, np.array([0, 0], np.int32))["cam_true"]
    # Grad-CAM of -z is ReLU of the negated linear map: the two never overlap
    assert np.all((pos == 0) | (neg == 0))
    assert (pos > 0).any() and (neg > 0).any()
    p = model(x).numpy()[:, 0]
    out = eng(x, np.array([0, 1], np.int32))
    np.testing.assert_array_equal(out["pred_idx"], (p > 0.5).astype(int))
    np.testing.assert_allclose(out["label_prob"], [1 - p[0], p[1]], rtol=1e-5)


def test_one_trace_for_many_batches_and_model_restored():
    model = make_cnn(3, 32)
    eng = _engine(model, 4, 32)
    for seed in range(3):
        x = (np.random.default_rng(seed).random((4, 32, 32, 3)) * 255).astype("float32")
        eng(x, np.zeros(4, np.int32))
    assert eng.concrete_functions == 1
    # the capture wrappers are gone: the model still predicts probabilities
    p = model(x).numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert "call" not in vars(eng.target.layer)


def test_engine_is_reused_for_same_model_and_geometry():
    model = make_cnn(3, 32)
    assert _engine(model, 4, 32) is _engine(model, 4, 32)
    assert _engine(model, 4, 32) is not _engine(model, 8, 32)


def test_unknown_method_is_a_clear_error():
    model = make_cnn(3, 32)
    with pytest.raises(BiasscopeError, match="available methods are gradcam"):
        make_cam("nosuchcam", model, choose_layer(model), output_head(model), batch_size=2,
                 input_shape=(32, 32, 3))
