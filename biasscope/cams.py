"""Batched class activation maps: one compiled function per batch shape.

Like pytorch-grad-cam, a base class runs the model, captures the target layer's activations A
(a token layer's patch tokens reshaped to their grid) and the gradients of the class scores with
respect to A, and asks each method for one thing: per-channel weights (``get_cam_weights``) or
the map itself (``get_cam_image``). Grad-CAM is then the spatial mean of the gradients.

One call computes, for a whole batch, the predictions, the CAM of the predicted class and the
CAM of the labelled class. The backward pass runs only through the head (scores -> A): the tape
does not watch variables, and A is watched where it is produced.
"""

from __future__ import annotations

import weakref
from typing import Callable


from .errors import BiasscopeError
from .methods import check_method
from .model import Capture, LayerInfo, OutputHead

from ._tf import import_tf  # noqa: E402

tf = import_tf()


def resolve_preprocess(preprocess) -> Callable:
    """``none`` (0..255 floats), ``scale01``, a ``keras.applications`` module name, or a callable."""
    if callable(preprocess):
        return preprocess
    if preprocess in (None, "none"):
        return lambda x: x
    if preprocess == "scale01":
        return lambda x: x / 255.0
    import keras

    module = getattr(keras.applications, str(preprocess), None)
    fn = getattr(module, "preprocess_input", None)
    if fn is None:
        raise BiasscopeError(f"--preprocess {preprocess!r}: expected none, scale01 or a "
                             "keras.applications module name (xception, resnet50, mobilenet_v2, ...)")
    return fn


class BaseCAM:
    """Runs the model once per batch and turns activations (+ gradients) into CAMs.

    A subclass overrides one thing: :meth:`get_cam_weights` (per-channel weights, as Grad-CAM,
    Grad-CAM++, XGrad-CAM, Score-CAM) or :meth:`get_cam_image` (a map from activations and
    gradients directly, as HiResCAM, LayerCAM, Eigen-CAM). The base applies the final ReLU.
    Methods without gradients set ``needs_gradients = False``: no backward pass is traced.
    Class-agnostic methods set ``class_specific = False``: the labelled-class map is the
    predicted-class map.
    """

    name = "base"
    needs_gradients = True
    class_specific = True

    def __init__(self, model, target: LayerInfo, head: OutputHead, *, batch_size: int,
                 input_shape: tuple, preprocess=None, top_k: int = 5, **options):
        if options:
            raise BiasscopeError(f"--method {self.name}: unknown option(s) {', '.join(sorted(options))}")
        self.model, self.target, self.head = model, target, head
        self.batch_size = int(batch_size)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.preprocess = resolve_preprocess(preprocess)
        self.n_classes = head.n_classes
        self.top_k = min(int(top_k), self.n_classes)
        spec = [tf.TensorSpec((self.batch_size, *self.input_shape), tf.float32),
                tf.TensorSpec((self.batch_size,), tf.int32)]
        # not converted by autograph: the methods are plain tensor code, and a BiasscopeError
        # raised while tracing (a layer no gradient reaches) must reach the user as itself
        self._step = tf.function(tf.autograph.experimental.do_not_convert(self._batch),
                                 input_signature=spec, reduce_retracing=False)

    # -- the one override -------------------------------------------------------------------
    def get_cam_weights(self, activations, grads, ctx):
        """Per-channel weights (B, K) from activations and gradients (B, h, w, K)."""
        raise NotImplementedError

    def get_cam_image(self, activations, grads, ctx):
        """The map before the final ReLU, (B, h, w): by default sum_k w_k A_k."""
        return tf.einsum("bhwk,bk->bhw", activations, self.get_cam_weights(activations, grads, ctx))

    # -- shared machinery -------------------------------------------------------------------
    def scores_and_probs(self, outputs, scores):
        """(class scores before the output activation, probabilities), both (B, n_classes)."""
        kind = self.head.kind
        if kind == "linear":
            return outputs, tf.nn.softmax(outputs, axis=-1)
        if kind == "sigmoid" and self.head.n_outputs == 1:
            # one sigmoid unit: the positive class scores +z, the negative class -z
            return tf.concat([-scores, scores], axis=-1), tf.concat([1.0 - outputs, outputs], axis=-1)
        return scores, outputs

    def _batch(self, images, labels):
        x = self.preprocess(images)
        labels = tf.maximum(labels, 0)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            with Capture(self.target, self.head, tape if self.needs_gradients else None) as cap:
                outputs = self.model(x, training=False)
            outputs = tf.cast(outputs, tf.float32)
            scores = outputs if cap.scores is None else tf.cast(cap.scores, tf.float32)
            scores, probs = self.scores_and_probs(outputs, scores)
            pred = tf.argmax(probs, axis=-1, output_type=tf.int32)
            score_pred = tf.reduce_sum(tf.gather(scores, pred, batch_dims=1))
            score_label = tf.reduce_sum(tf.gather(scores, labels, batch_dims=1))
        activations = tf.cast(cap.activations, tf.float32)
        ctx = CamContext(inputs=x, classes=pred)

        def grads_of(score):
            if not self.needs_gradients:
                return None
            g = tape.gradient(score, cap.raw)
            if g is None:
                raise BiasscopeError(f"--method {self.name}: the class scores do not depend on layer "
                                     f"{self.target.path!r} (no gradient reaches it); choose a layer "
                                     "on the path to the output (see `biasscope layers MODEL`)")
            return tf.cast(cap.as_grid(g), tf.float32)

        cam_pred = tf.nn.relu(self.get_cam_image(activations, grads_of(score_pred), ctx))
        if self.class_specific:
            ctx = CamContext(inputs=x, classes=labels, cache=ctx.cache)
            cam_true = tf.nn.relu(self.get_cam_image(activations, grads_of(score_label), ctx))
        else:
            cam_true = cam_pred
        top_p, top_i = tf.math.top_k(probs, k=self.top_k)
        return {
            "pred_idx": pred,
            "confidence": tf.reduce_max(probs, axis=-1),
            "label_prob": tf.gather(probs, labels, batch_dims=1),
            "top_idx": top_i,
            "top_prob": top_p,
            "cam_pred": cam_pred,
            "cam_true": cam_true,
        }

    def __call__(self, images, labels) -> dict:
        """images (B, H, W, C) float32 in the model's raw input range; labels (B,) int32."""
        out = self._step(images, labels)
        return {k: v.numpy() for k, v in out.items()}

    def trace(self) -> None:
        """Build the graph now, so that a layer or method that cannot work fails before a scan
        writes anything."""
        self._step.get_concrete_function()

    @property
    def concrete_functions(self) -> int:
        """How many graphs were traced (1 means no retracing)."""
        return self._step.experimental_get_tracing_count()


class CamContext:
    """What a method may need besides A and the gradients: the preprocessed inputs (B, H, W, C),
    the class each map is for (B,), and a per-batch cache shared by the two maps of a batch."""

    def __init__(self, inputs, classes, cache=None):
        self.inputs, self.classes = inputs, classes
        self.cache = {} if cache is None else cache


class GradCAM(BaseCAM):
    """Selvaraju et al. 2017: w_k = mean_ij g_ijk."""

    name = "gradcam"

    def get_cam_weights(self, activations, grads, ctx):
        return tf.reduce_mean(grads, axis=(1, 2))


class GradCAMPlusPlus(BaseCAM):
    """Chattopadhyay et al. 2018, eq. 19 with the exponential-score closed form:
    alpha = g^2 / (2 g^2 + sum_ij(A) g^3), w_k = sum_ij alpha * ReLU(g).

    As pytorch-grad-cam, alpha is not renormalised per channel (tf-keras-vis divides alpha by
    its spatial sum where it is non-zero; that version is not this one)."""

    name = "gradcampp"

    def get_cam_weights(self, activations, grads, ctx):
        g2 = tf.square(grads)
        g3 = g2 * grads
        sum_a = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
        alpha = g2 / (2.0 * g2 + sum_a * g3 + 1e-6)
        alpha = tf.where(grads != 0, alpha, tf.zeros_like(alpha))
        return tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2))


class XGradCAM(BaseCAM):
    """Fu et al. 2020: w_k = sum_ij (A_ijk / sum_ij A_ijk) g_ijk."""

    name = "xgradcam"

    def get_cam_weights(self, activations, grads, ctx):
        sum_a = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
        return tf.reduce_sum(grads * activations / (sum_a + 1e-7), axis=(1, 2))


class HiResCAM(BaseCAM):
    """Draelos & Carin 2020: sum_k g_ijk A_ijk (the element-wise product, no spatial pooling)."""

    name = "hirescam"

    def get_cam_image(self, activations, grads, ctx):
        return tf.reduce_sum(grads * activations, axis=-1)


class LayerCAM(BaseCAM):
    """Jiang et al. 2021: sum_k ReLU(g_ijk) A_ijk."""

    name = "layercam"

    def get_cam_image(self, activations, grads, ctx):
        return tf.reduce_sum(tf.nn.relu(grads) * activations, axis=-1)


class EigenCAM(BaseCAM):
    """Muhammad & Yeasin 2020: A (hw x K, centred per channel) projected on its first right
    singular vector. The sign, which the SVD leaves open, is chosen so that the map correlates
    positively with the mean activation over channels. No gradients, no class."""

    name = "eigencam"
    needs_gradients = False
    class_specific = False

    def get_cam_image(self, activations, grads, ctx):
        b, h, w, k = (tf.shape(activations)[i] for i in range(4))
        flat = tf.reshape(activations, (b, h * w, k))
        centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
        _, _, v = tf.linalg.svd(centred, full_matrices=False)  # v: (B, K, min(hw, K))
        proj = tf.einsum("bpk,bk->bp", centred, v[:, :, 0])
        mean = tf.reduce_mean(flat, axis=2)
        corr = tf.reduce_sum((proj - tf.reduce_mean(proj, 1, keepdims=True))
                             * (mean - tf.reduce_mean(mean, 1, keepdims=True)), axis=1, keepdims=True)
        proj = tf.where(corr < 0, -proj, proj)
        return tf.reshape(proj, (b, h, w))


class ScoreCAM(BaseCAM):
    """Wang et al. 2020, batched. Each of the N channels with the highest mean activation
    (``scorecam_channels``, default 32; all when the layer has fewer) is upsampled to the input
    (bilinear), min-max normalised to [0, 1] and multiplied into the preprocessed input; its
    weight is the model's probability of the class on that masked input; channels outside the
    top N weigh 0. The N masked forward passes of a batch run in the compiled step, one channel
    at a time over the whole batch, and serve the predicted- and labelled-class maps alike."""

    name = "scorecam"
    needs_gradients = False

    def __init__(self, *args, scorecam_channels: int = 32, **kwargs):
        self.n_channels = check_method(self.name, scorecam_channels)["scorecam_channels"]
        super().__init__(*args, **kwargs)

    def _masked_probs(self, activations, inputs):
        """(top-N channel indices (B, N), probabilities on the masked inputs (B, N, n_classes))."""
        k = int(activations.shape[-1])
        n = min(self.n_channels, k)
        _, idx = tf.math.top_k(tf.reduce_mean(activations, axis=(1, 2)), k=n)
        maps = tf.gather(activations, idx, axis=3, batch_dims=1)  # (B, h, w, N)
        maps = tf.image.resize(maps, self.input_shape[:2], method="bilinear")
        lo = tf.reduce_min(maps, axis=(1, 2), keepdims=True)
        hi = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
        masks = (maps - lo) / (hi - lo + 1e-8)
        masks = tf.transpose(masks, (3, 0, 1, 2))[..., None]  # (N, B, H, W, 1)

        def one(mask):
            outputs = tf.cast(self.model(inputs * mask, training=False), tf.float32)
            return self.scores_and_probs(outputs, outputs)[1]

        probs = tf.map_fn(one, masks, fn_output_signature=tf.float32)  # (N, B, classes)
        return idx, tf.transpose(probs, (1, 0, 2))

    def get_cam_weights(self, activations, grads, ctx):
        if "scorecam" not in ctx.cache:
            ctx.cache["scorecam"] = self._masked_probs(activations, ctx.inputs)
        idx, probs = ctx.cache["scorecam"]
        w = tf.gather(probs, ctx.classes, axis=2, batch_dims=1)  # (B, N)
        k = int(activations.shape[-1])
        return tf.reduce_sum(tf.one_hot(idx, k) * w[..., None], axis=1)  # (B, K)


METHODS = {cls.name: cls for cls in (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM,
                                     EigenCAM, ScoreCAM)}


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def make_cam(method: str, model, target: LayerInfo, head: OutputHead, *, batch_size: int,
             input_shape: tuple, preprocess=None, **options) -> BaseCAM:
    """The CAM engine for this model and geometry, reused while the model object lives.

    ``options`` are the method's own (``scorecam_channels`` for ``scorecam``). Reuse keeps the
    traced graph: a notebook scanning several datasets with one model, or the benchmark after
    its warm-up, pays for tracing once.
    """
    check_method(method)
    cls = METHODS[method]
    key = (method, target.path, int(batch_size), tuple(input_shape), preprocess,
           tuple(sorted(options.items())))
    per_model = _ENGINES.setdefault(model, {})
    if key not in per_model:
        per_model[key] = cls(model, target, head, batch_size=batch_size, input_shape=input_shape,
                             preprocess=preprocess, **options)
    return per_model[key]


def compiled_forward(model, *, batch_size: int, input_shape: tuple, preprocess=None):
    """The baseline of the benchmark: the model's compiled batched forward pass, nothing else."""
    pre = resolve_preprocess(preprocess)
    spec = [tf.TensorSpec((int(batch_size), *input_shape), tf.float32)]

    @tf.function(input_signature=spec, autograph=False)
    def forward(images):
        return model(pre(images), training=False)

    return forward
