"""Batched class activation maps: one compiled function per batch shape.

Like pytorch-grad-cam, a base class runs the model, captures the target layer's activations A
and the gradients of the class scores with respect to A, and asks each method for one thing:
``get_cam_weights(activations, grads)``. Grad-CAM is then the spatial mean of the gradients.

One call computes, for a whole batch, the predictions, the CAM of the predicted class and the
CAM of the labelled class. The backward pass runs only through the head (scores -> A): the tape
does not watch variables, and A is watched where it is produced.
"""

from __future__ import annotations

import weakref
from typing import Callable


from .errors import BiasscopeError
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
    """Runs the model once per batch and turns activations + gradients into CAMs.

    Subclasses override :meth:`get_cam_weights` only.
    """

    name = "base"

    def __init__(self, model, target: LayerInfo, head: OutputHead, *, batch_size: int,
                 input_shape: tuple, preprocess=None, top_k: int = 5):
        self.model, self.target, self.head = model, target, head
        self.batch_size = int(batch_size)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.preprocess = resolve_preprocess(preprocess)
        self.n_classes = head.n_classes
        self.top_k = min(int(top_k), self.n_classes)
        spec = [tf.TensorSpec((self.batch_size, *self.input_shape), tf.float32),
                tf.TensorSpec((self.batch_size,), tf.int32)]
        self._step = tf.function(self._batch, input_signature=spec, reduce_retracing=False)

    # -- the one override -------------------------------------------------------------------
    def get_cam_weights(self, activations, grads):
        """Per-channel weights of shape (B, K) from activations and gradients (B, h, w, K)."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------
    def _scores_and_probs(self, outputs, scores):
        kind = self.head.kind
        if kind == "linear":
            return outputs, tf.nn.softmax(outputs, axis=-1)
        if kind == "sigmoid" and self.head.n_outputs == 1:
            # one sigmoid unit: the positive class scores +z, the negative class -z
            return tf.concat([-scores, scores], axis=-1), tf.concat([1.0 - outputs, outputs], axis=-1)
        return scores, outputs

    def _batch(self, images, labels):
        x = self.preprocess(images)
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            with Capture(self.target, self.head, tape) as cap:
                outputs = self.model(x, training=False)
            outputs = tf.cast(outputs, tf.float32)
            scores = outputs if cap.scores is None else tf.cast(cap.scores, tf.float32)
            scores, probs = self._scores_and_probs(outputs, scores)
            pred = tf.argmax(probs, axis=-1, output_type=tf.int32)
            score_pred = tf.reduce_sum(tf.gather(scores, pred, batch_dims=1))
            score_label = tf.reduce_sum(tf.gather(scores, tf.maximum(labels, 0), batch_dims=1))
        activations = cap.activations
        cam_pred = self._cam_from(activations, tape.gradient(score_pred, activations))
        cam_true = self._cam_from(activations, tape.gradient(score_label, activations))
        del tape
        top_p, top_i = tf.math.top_k(probs, k=self.top_k)
        return {
            "pred_idx": pred,
            "confidence": tf.reduce_max(probs, axis=-1),
            "label_prob": tf.gather(probs, tf.maximum(labels, 0), batch_dims=1),
            "top_idx": top_i,
            "top_prob": top_p,
            "cam_pred": cam_pred,
            "cam_true": cam_true,
        }

    def _cam_from(self, activations, grads):
        activations = tf.cast(activations, tf.float32)
        grads = tf.cast(grads, tf.float32)
        weights = self.get_cam_weights(activations, grads)
        return tf.nn.relu(tf.einsum("bhwk,bk->bhw", activations, weights))

    def __call__(self, images, labels) -> dict:
        """images (B, H, W, C) float32 in the model's raw input range; labels (B,) int32."""
        out = self._step(images, labels)
        return {k: v.numpy() for k, v in out.items()}

    @property
    def concrete_functions(self) -> int:
        """How many graphs were traced (1 means no retracing)."""
        return self._step.experimental_get_tracing_count()


class GradCAM(BaseCAM):
    """Selvaraju et al. 2017: alpha_k = mean_ij dy_c / dA^k_ij."""

    name = "gradcam"

    def get_cam_weights(self, activations, grads):
        return tf.reduce_mean(grads, axis=(1, 2))


METHODS = {GradCAM.name: GradCAM}


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def make_cam(method: str, model, target: LayerInfo, head: OutputHead, *, batch_size: int,
             input_shape: tuple, preprocess=None) -> BaseCAM:
    """The CAM engine for this model and geometry, reused while the model object lives.

    Reuse keeps the traced graph: a notebook scanning several datasets with one model, or the
    benchmark after its warm-up, pays for tracing once.
    """
    try:
        cls = METHODS[method]
    except KeyError:
        raise BiasscopeError(f"--method {method!r}: available methods are {', '.join(METHODS)}") from None
    key = (method, target.path, int(batch_size), tuple(input_shape), preprocess)
    per_model = _ENGINES.setdefault(model, {})
    if key not in per_model:
        per_model[key] = cls(model, target, head, batch_size=batch_size, input_shape=input_shape,
                             preprocess=preprocess)
    return per_model[key]


def compiled_forward(model, *, batch_size: int, input_shape: tuple, preprocess=None):
    """The baseline of the benchmark: the model's compiled batched forward pass, nothing else."""
    pre = resolve_preprocess(preprocess)
    spec = [tf.TensorSpec((int(batch_size), *input_shape), tf.float32)]

    @tf.function(input_signature=spec)
    def forward(images):
        return model(pre(images), training=False)

    return forward
