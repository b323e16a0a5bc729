"""Every CAM method of the batched engine against an independent per-image reference.

The references are the papers' formulas written out in numpy (pytorch-grad-cam's reading of them,
as in the docstrings of biasscope.cams), fed with the activations A and gradients g of ONE image
obtained by a sub-model and a GradientTape, not by the engine's capture. Where tf-keras-vis
implements the same definition (Grad-CAM, LayerCAM, Score-CAM over all channels) it is a second,
third-party oracle.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from biasscope.api import resolve_target
from biasscope.cams import make_cam
from biasscope.errors import BiasscopeError
from biasscope.model import choose_layer, find_layer, output_head, target_layers
from conftest import make_cnn, make_vit

METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam")
GRADIENT_METHODS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam")
SIZE, BATCH = 32, 4
ATOL = 1e-4


# -- models and data ----------------------------------------------------------------------------
def _sharpen(model, factor):
    """Scale the head so that the classes' probabilities differ clearly (a fresh head gives about
    1/3 each, which would let Score-CAM weights of the wrong class pass unnoticed)."""
    head = model.get_layer("head")
    head.kernel.assign(head.kernel * factor)
    return model


@pytest.fixture(scope="module")
def cnn():
    return _sharpen(make_cnn(3, SIZE, seed=4), 40.0)


@pytest.fixture(scope="module")
def vit():
    return _sharpen(make_vit(3, SIZE, seed=4), 8.0)


def _batch(model, seed):
    """4 images in 0..255 and labels of which some differ from the model's prediction."""
    x = (np.random.default_rng(seed).random((BATCH, SIZE, SIZE, 3)) * 255).astype("float32")
    pred = np.argmax(model(x).numpy(), axis=1)
    labels = ((pred + np.array([0, 1, 2, 0])) % 3).astype(np.int32)
    assert (labels != pred).sum() == 2
    return x, labels, pred


def _maxnorm(h):
    m = h.max()
    return h / m if m > 0 else h


# -- the reference: A and g of one image, then the formula ------------------------------------
def _activations_and_grads(model, layer_name, image, classes, grid=None):
    """A (h, w, K) and the gradients dz_c/dA for each class c (pre-softmax score z) of ONE image,
    from ``keras.Model(inputs, [layer.output, model.output])`` with the softmax removed.
    ``grid=(h, w)`` reshapes a token layer's (1, T, D) output (no extra tokens) row-major."""
    head = model.get_layer("head")
    saved = head.activation
    head.activation = None
    try:
        sub = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.output])
        with tf.GradientTape(persistent=True) as tape:
            A, z = sub(image[None])
            scores = [z[0, int(c)] for c in classes]
        grads = [tape.gradient(s, A).numpy()[0] for s in scores]
        del tape
    finally:
        head.activation = saved
    A = A.numpy()[0]
    if grid is not None:
        A = A.reshape(*grid, A.shape[-1])
        grads = [g.reshape(*grid, g.shape[-1]) for g in grads]
    return A.astype(np.float64), [g.astype(np.float64) for g in grads]


def _ref_gradcam(A, g):
    return np.maximum(np.einsum("hwk,k->hw", A, g.mean(axis=(0, 1))), 0)


def _ref_gradcampp(A, g):
    g2, g3 = g ** 2, g ** 3
    alpha = g2 / (2 * g2 + A.sum(axis=(0, 1)) * g3 + 1e-6)
    alpha = np.where(g != 0, alpha, 0.0)
    w = (alpha * np.maximum(g, 0)).sum(axis=(0, 1))
    return np.maximum(np.einsum("hwk,k->hw", A, w), 0)


def _ref_xgradcam(A, g):
    w = (A * g).sum(axis=(0, 1)) / (A.sum(axis=(0, 1)) + 1e-7)
    return np.maximum(np.einsum("hwk,k->hw", A, w), 0)


def _ref_hirescam(A, g):
    return np.maximum((g * A).sum(axis=-1), 0)


def _ref_layercam(A, g):
    return np.maximum((np.maximum(g, 0) * A).sum(axis=-1), 0)


def _ref_eigencam(A):
    h, w, k = A.shape
    flat = A.reshape(h * w, k)
    centred = flat - flat.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[0]
    mean = flat.mean(axis=1)  # over channels, uncentred
    if np.sum((proj - proj.mean()) * (mean - mean.mean())) < 0:
        proj = -proj
    return np.maximum(proj, 0).reshape(h, w)


def _ref_scorecam(model, A, image, classes, n_channels):
    """Top-N channels by spatial mean, each upsampled, min-max normalised, multiplied into the
    image and scored by the model's softmax probability on that one masked image."""
    top = np.argsort(-A.mean(axis=(0, 1)), kind="stable")[:min(n_channels, A.shape[-1])]
    probs = []
    for k in top:
        m = tf.image.resize(A[..., k:k + 1].astype(np.float32)[None], (SIZE, SIZE), "bilinear")
        m = m.numpy()[0].astype(np.float64)
        m = (m - m.min()) / (m.max() - m.min() + 1e-8)
        masked = (image.astype(np.float64) * m).astype(np.float32)
        probs.append(model(masked[None], training=False).numpy()[0].astype(np.float64))
    probs = np.array(probs)  # (N, classes)
    return [np.maximum(np.einsum("hwn,n->hw", A[..., top], probs[:, int(c)]), 0) for c in classes]


_GRAD_REFS = {"gradcam": _ref_gradcam, "gradcampp": _ref_gradcampp, "xgradcam": _ref_xgradcam,
              "hirescam": _ref_hirescam, "layercam": _ref_layercam}


def _references(method, model, layer_name, image, classes, grid=None, **options):
    """The reference maps of one image for each class in ``classes``."""
    A, grads = _activations_and_grads(model, layer_name, image, classes, grid)
    if method in _GRAD_REFS:
        return [_GRAD_REFS[method](A, g) for g in grads]
    if method == "eigencam":
        return [_ref_eigencam(A)] * len(classes)
    return _ref_scorecam(model, A, image, classes, options.get("scorecam_channels", 32))


def _engine(method, model, layer_name, **options):
    info = find_layer(model, layer_name, input_shape=(SIZE, SIZE, 3))
    return make_cam(method, model, info, output_head(model), batch_size=BATCH,
                    input_shape=(SIZE, SIZE, 3), preprocess=None, **options)


def _check_against_reference(method, model, layer_name, seed, grid=None, **options):
    """Engine maps == reference maps (after max-normalisation) for the predicted and labelled
    class of every image; returns the engine output and the references for further checks."""
    x, labels, pred = _batch(model, seed)
    out = _engine(method, model, layer_name, **options)(x, labels)
    np.testing.assert_array_equal(out["pred_idx"], pred)
    refs = []
    for i in range(BATCH):
        ref_pred, ref_true = _references(method, model, layer_name, x[i], (pred[i], labels[i]),
                                         grid, **options)
        assert out["cam_pred"][i].shape == ref_pred.shape
        np.testing.assert_allclose(_maxnorm(out["cam_pred"][i]), _maxnorm(ref_pred), atol=ATOL, rtol=0)
        np.testing.assert_allclose(_maxnorm(out["cam_true"][i]), _maxnorm(ref_true), atol=ATOL, rtol=0)
        refs.append((ref_pred, ref_true))
    # the comparison is not vacuous: most maps of the predicted class have positive values (a
    # token layer's activations may be all negative where the weights are positive), and for a
    # class-specific method the labelled class's map differs where the label does
    assert sum(r[0].max() > 0 for r in refs) >= BATCH - 1, [float(r[0].max()) for r in refs]
    if method != "eigencam":
        differ = [np.abs(_maxnorm(refs[i][0]) - _maxnorm(refs[i][1])).max()
                  for i in range(BATCH) if labels[i] != pred[i]]
        assert max(differ) > 0.05, differ
    return x, out, refs, labels, pred


# -- every method against its reference ---------------------------------------------------------
# At last_conv (-> GAP -> Dense) the gradient is the same at every position, so HiResCAM equals
# Grad-CAM there and XGrad-CAM/LayerCAM differ from it only by per-channel factors; conv2 (->
# pool -> conv) has gradients that vary over the map and tells the methods apart.
@pytest.mark.parametrize("layer, hw", [("last_conv", 8), ("conv2", 16)])
@pytest.mark.parametrize("method", METHODS)
def test_cnn_maps_match_per_image_reference(cnn, method, layer, hw):
    _, out, refs, _, _ = _check_against_reference(method, cnn, layer, seed=0)
    assert out["cam_pred"].shape == (BATCH, hw, hw)
    if method in ("eigencam", "scorecam"):
        assert (out["cam_pred"].reshape(BATCH, -1).max(axis=1) > 0).all()
        assert (out["cam_true"].reshape(BATCH, -1).max(axis=1) > 0).all()
    if method == "eigencam":  # class-agnostic: the labelled-class map is the predicted-class map
        np.testing.assert_array_equal(out["cam_true"], out["cam_pred"])


# HiResCAM is checked on block2_mlp2 (the MLP branch that block2_out adds): at block2_out, which
# only a LayerNormalization reads, sum_k g_k A_k nearly cancels (a norm is blind to the scale
# of its input, so the gradient is orthogonal to A up to the norm's epsilon) and the normalised
# map is float32 rounding amplified ~2e4 times; test_hirescam_before_a_layernorm covers it.
VIT_CASES = [(m, "block2_mlp2" if m == "hirescam" else "block2_out") for m in METHODS]


@pytest.mark.parametrize("method, layer", VIT_CASES)
def test_vit_token_maps_match_per_image_reference(vit, method, layer):
    info = find_layer(vit, layer, input_shape=(SIZE, SIZE, 3))
    assert info.is_tokens and info.shape == (4, 4, 16) and info.extra == 0
    out = _check_against_reference(method, vit, layer, seed=1, grid=(4, 4))[1]
    assert out["cam_pred"].shape == (BATCH, 4, 4)
    if method in ("eigencam", "scorecam"):
        assert (out["cam_pred"].reshape(BATCH, -1).max(axis=1) > 0).all()


def test_vit_automatic_target_is_the_last_block(vit):
    assert choose_layer(vit).path == "block2_out"


def test_hirescam_before_a_layernorm(vit):
    """At block2_out the engine's raw HiResCAM equals the reference to float32 rounding of the
    terms it sums (1e-6 of max_ij sum_k |g A|), although the map itself is only ~5e-5 of that."""
    x, labels, pred = _batch(vit, 1)
    out = _engine("hirescam", vit, "block2_out")(x, labels)
    for i in range(BATCH):
        A, grads = _activations_and_grads(vit, "block2_out", x[i], (pred[i], labels[i]), (4, 4))
        for key, g in zip(("cam_pred", "cam_true"), grads):
            scale = np.abs(g * A).sum(axis=-1).max()
            ref = _ref_hirescam(A, g)
            assert ref.max() < 1e-2 * scale  # the cancellation the ViT case above avoids
            np.testing.assert_allclose(out[key][i], ref, atol=1e-6 * scale, rtol=0)


@pytest.mark.parametrize("n_channels", [5, 16, 64])
def test_scorecam_channel_count(cnn, n_channels):
    """N < K keeps the N channels of highest mean activation (the others weigh 0); N >= K is
    all K channels."""
    x, out, refs, labels, pred = _check_against_reference("scorecam", cnn, "last_conv", seed=2,
                                                         scorecam_channels=n_channels)
    assert (out["cam_pred"].reshape(BATCH, -1).max(axis=1) > 0).all()
    if n_channels < 16:  # the choice of channels matters: all 16 give other maps
        full = [_references("scorecam", cnn, "last_conv", x[i], (pred[i],), scorecam_channels=16)[0]
                for i in range(BATCH)]
        gap = max(np.abs(_maxnorm(f) - _maxnorm(r[0])).max() for f, r in zip(full, refs))
        assert gap > 0.05, gap


# -- tf-keras-vis as a third-party oracle -------------------------------------------------------
# Grad-CAM++ is not compared with tf-keras-vis: it renormalises alpha per channel (another definition).
def _tkv_maps(cls_name, model, layer_name, x, classes, **kwargs):
    pytest.importorskip("tf_keras_vis")
    import tf_keras_vis.gradcam
    import tf_keras_vis.layercam
    import tf_keras_vis.scorecam
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    from tf_keras_vis.utils.scores import CategoricalScore

    module = {"Gradcam": tf_keras_vis.gradcam, "Layercam": tf_keras_vis.layercam,
              "Scorecam": tf_keras_vis.scorecam}[cls_name]
    vis = getattr(module, cls_name)(model, model_modifier=ReplaceToLinear(), clone=True)
    cam = vis(CategoricalScore([int(c) for c in classes]), x, penultimate_layer=layer_name,
              seek_penultimate_conv_layer=False, expand_cam=False, normalize_cam=False, **kwargs)
    return np.asarray(cam)


@pytest.mark.parametrize("method, cls_name", [("gradcam", "Gradcam"), ("layercam", "Layercam")])
@pytest.mark.parametrize("arch, layer, grid", [("cnn", "last_conv", (8, 8)), ("cnn", "conv2", (16, 16)),
                                               ("vit", "block2_out", (4, 4))],
                         ids=["cnn-last_conv", "cnn-conv2", "vit-block2_out"])
def test_gradient_methods_match_tf_keras_vis(request, arch, layer, grid, method, cls_name):
    model = request.getfixturevalue(arch)
    x, labels, pred = _batch(model, 3)
    out = _engine(method, model, layer)(x, labels)
    for key, classes in (("cam_pred", pred), ("cam_true", labels)):
        theirs = _tkv_maps(cls_name, model, layer, x, classes).reshape(BATCH, *grid)
        assert (theirs.reshape(BATCH, -1).max(axis=1) > 0).any()
        for i in range(BATCH):
            np.testing.assert_allclose(_maxnorm(out[key][i]), _maxnorm(theirs[i]), atol=ATOL, rtol=0)
    # the model given to tf-keras-vis was a clone: ours still ends in softmax
    np.testing.assert_allclose(model(x).numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_scorecam_matches_tf_keras_vis_at_input_resolution(cnn):
    """On conv1 (32x32 = the input, 8 channels) both upsamplings are the identity; tf-keras-vis
    takes the softmax of the model's outputs itself, so it gets the linear model."""
    x, labels, pred = _batch(cnn, 4)
    out = _engine("scorecam", cnn, "conv1", scorecam_channels=8)(x, labels)
    for key, classes in (("cam_pred", pred), ("cam_true", labels)):
        theirs = _tkv_maps("Scorecam", cnn, "conv1", x, classes, max_N=None, batch_size=32)
        assert theirs.shape == (BATCH, SIZE, SIZE)
        assert (theirs.reshape(BATCH, -1).max(axis=1) > 0).all()
        for i in range(BATCH):
            np.testing.assert_allclose(_maxnorm(out[key][i]), _maxnorm(theirs[i]), atol=ATOL, rtol=0)


# -- a layer the class scores do not depend on ------------------------------------------------
class _SideBranch(keras.layers.Layer):
    """Runs a conv on its input on every call and throws the result away: ``side_conv`` is run
    and reachable by the capture, but the class scores do not depend on it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.side = keras.layers.Conv2D(4, 3, padding="same", name="side_conv")

    def build(self, input_shape):
        self.side.build(input_shape)

    def call(self, x):
        self.side(x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape


def _side_branch_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(x)
    x = _SideBranch(name="side")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inp, out)


def _side_engine(method, layer="side_conv"):
    model = _side_branch_model()
    info = find_layer(model, layer, input_shape=(SIZE, SIZE, 3))
    eng = make_cam(method, model, info, output_head(model), batch_size=2, input_shape=(SIZE, SIZE, 3))
    x = (np.random.default_rng(0).random((2, SIZE, SIZE, 3)) * 255).astype("float32")
    return eng, x, np.zeros(2, np.int32)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_method_on_layer_the_scores_ignore_is_detected(method):
    eng, x, labels = _side_engine(method)
    assert eng.target.path == "side/side_conv" and eng.target.shape == (SIZE, SIZE, 4)
    with pytest.raises(Exception, match=r"do not depend on layer 'side/side_conv'"):
        eng.trace()
    # the same layer is fine for a gradient-free method, and conv_a for this method
    eig, _, _ = _side_engine("eigencam")
    cam = eig(x, labels)["cam_pred"]
    assert cam.shape == (2, SIZE, SIZE) and (cam.reshape(2, -1).max(axis=1) > 0).all()
    ok, _, _ = _side_engine(method, "conv_a")
    assert ok(x, labels)["cam_pred"].shape == (2, SIZE, SIZE)


def test_layer_the_scores_ignore_is_a_biasscope_error():
    eng, x, labels = _side_engine("gradcam")
    with pytest.raises(BiasscopeError, match=r"do not depend on layer 'side/side_conv'"):
        eng.trace()
    with pytest.raises(BiasscopeError, match=r"do not depend on layer 'side/side_conv'"):
        eng(x, labels)


def test_cls_token_head_last_block_rejected_for_gradient_methods():
    """keras-hub ViT with a class token: after the last attention the head reads only the CLS
    token, so the patch tokens of the last block get no gradient."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    bb = keras_hub.models.ViTBackbone(image_shape=(SIZE, SIZE, 3), patch_size=8, num_layers=2,
                                      num_heads=2, hidden_dim=16, mlp_dim=32, use_class_token=True)
    model = keras_hub.models.ViTImageClassifier(backbone=bb, num_classes=3, preprocessor=None)
    geometry = (SIZE, SIZE, 3)
    paths = [i.path for i in target_layers(model, geometry)]
    # keras numbers the backbone's name when several are built in one process
    last = f"{bb.name}/vit_encoder/transformer_block_2"
    prev = f"{bb.name}/vit_encoder/transformer_block_1"
    assert last in paths and prev in paths, paths
    assert choose_layer(model, input_shape=geometry).path == prev
    for method in GRADIENT_METHODS:
        with pytest.raises(BiasscopeError, match=rf"layer '{last}'.*do not depend"):
            resolve_target(model, last, method, geometry)
    for method in ("eigencam", "scorecam"):
        assert resolve_target(model, last, method, geometry).path == last
    info = resolve_target(model, prev, "gradcam", geometry)
    assert info.path == prev and info.extra == 1 and info.shape == (4, 4, 16)
