"""Model handling: loading, target-layer discovery (inside nested models) and the output head.

Grad-CAM needs two tensors from one forward pass: the target layer's activations A and the class
scores *before* softmax/sigmoid. Building a second ``keras.Model`` for them breaks on the most
common transfer-learning shape, ``Sequential([base_model, GlobalAveragePooling2D(), Dense(...)])``:
the inner layer's symbolic output is not connected to the outer model's inputs. Instead we run the
model itself and *capture* both tensors while it runs (:class:`Capture`), which works for any
nesting depth and any graph, and leaves the model unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BiasscopeError

# Layers that carry no spatial computation of their own: when they follow a skipped
# "conv logits" head they are skipped with it.
_PASS_THROUGH = {"Activation", "ReLU", "Dropout", "SpatialDropout2D", "Softmax", "LeakyReLU",
                 "ELU", "PReLU", "Identity"}
# Token layers the automatic choice passes over: per-token normalisation and the like, whose
# output is the block output it follows, rescaled.
_TRIVIAL = _PASS_THROUGH | {"LayerNormalization", "RMSNormalization", "BatchNormalization",
                            "GroupNormalization", "UnitNormalization"}


@dataclass(frozen=True)
class LayerInfo:
    """A layer to take CAMs from, addressed by its nested path.

    A *spatial* layer has a 4-D (batch, H, W, C) output. A *token* layer has a 3-D (batch, T, D)
    output with T = extra + h * w: the first ``extra`` tokens (CLS, distillation, registers) are
    dropped and the rest reshaped to the (h, w) patch grid; ``shape`` is then (h, w, D).
    """

    path: str           # "xception/block14_sepconv2_act"; "vit/vit_encoder/transformer_block_2"
    class_name: str
    shape: tuple        # (H, W, C), or the patch grid and width (h, w, D) of a token layer
    layer: object       # the keras layer itself
    n_tokens: int | None = None   # T of a token layer; None for a spatial layer
    extra: int = 0                # tokens before the patch tokens
    patch: tuple = ()             # (ph, pw) of the patch-embedding conv before the tokens, if any
    patch_layer: str = ""         # that conv's path
    trivial: bool = False         # a norm/dropout-like layer, or a composite ending in one

    @property
    def spatial(self) -> int:
        return int(self.shape[0] or 0) * int(self.shape[1] or 0)

    @property
    def is_tokens(self) -> bool:
        return self.n_tokens is not None

    def describe(self) -> str:
        """The output as a user reads it: "(7, 7, 2048)" or "197 tokens = 1 extra + 14x14 grid, D 768"."""
        if not self.is_tokens:
            return str(tuple(self.shape))
        h, w, d = self.shape
        extra = f"{self.extra} extra + " if self.extra else ""
        return f"{self.n_tokens} tokens = {extra}{h}x{w} grid, D {d}"

    def as_grid(self, t):
        """A (B, T, D) tensor of this layer as (B, h, w, D); a spatial layer's tensor unchanged."""
        if not self.is_tokens:
            return t
        from ._tf import import_tf

        tf = import_tf()
        h, w, d = (int(v) for v in self.shape)
        return tf.reshape(t[:, self.extra:, :], (-1, h, w, d))


@dataclass(frozen=True)
class OutputHead:
    """Where the pre-activation class scores come from and how scores turn into probabilities.

    kind: "softmax" | "sigmoid" | "linear". For "softmax"/"sigmoid" the scores are captured as the
    input of ``layer``'s activation (``via == "activation"``) or of the layer's call
    (``via == "call"``, for Activation/Softmax layers). ``n_outputs`` is the width of the model's
    output; ``n_classes`` is 2 for a single sigmoid unit (scores become [-z, +z]).
    """

    kind: str
    layer: object
    via: str
    n_outputs: int

    @property
    def n_classes(self) -> int:
        return 2 if (self.kind == "sigmoid" and self.n_outputs == 1) else self.n_outputs


def _keras():
    from ._tf import import_tf

    import_tf()
    import keras

    return keras


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _looks_like_keras_file(path: Path) -> bool:
    """A ``.keras`` zip holding ``config.json``, or an HDF5 file (``.h5``/``.hdf5``); decided from
    the name and the first bytes, so that a file of anything else gets a plain reason instead of
    the loader's "File not found"."""
    import zipfile

    suffix = path.suffix.lower()
    try:
        if suffix == ".keras":
            if not zipfile.is_zipfile(path):
                return False
            with zipfile.ZipFile(path) as zf:
                return "config.json" in zf.namelist()
        if suffix in {".h5", ".hdf5"}:
            with open(path, "rb") as fh:  # HDF5 allows a user block of 512 * 2**k bytes first
                for at in (0, 512, 1024, 2048, 4096):
                    fh.seek(at)
                    if fh.read(8) == _HDF5_SIGNATURE:
                        return True
            return False
    except (OSError, zipfile.BadZipFile):
        return False
    return False


def _import_hub_if_needed(path: Path) -> None:
    """keras-hub classes register themselves for deserialisation when keras_hub is imported;
    a ``.keras`` file built from them names ``keras_hub`` in its config."""
    import zipfile

    if path.suffix.lower() != ".keras":
        return
    with zipfile.ZipFile(path) as zf:
        if b"keras_hub" not in zf.read("config.json"):
            return
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        raise BiasscopeError(f"{path} was built with keras-hub, which is not installed; "
                             "pip install 'biasscope[hub]'") from None


def load_model(path, *, unsafe: bool = False):
    """Load a ``.keras`` file, a legacy ``.h5`` file or a SavedModel directory.

    Keras' safe mode stays on unless ``unsafe=True`` (needed for models with Lambda layers).
    Raises :class:`BiasscopeError` with a one-line reason for anything that is not a model.
    """
    keras = _keras()
    path = Path(path)
    if not path.exists():
        raise BiasscopeError(f"model not found: {path}")
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").exists():
                raise BiasscopeError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
            try:
                return keras.models.load_model(path, safe_mode=not unsafe)
            except (ValueError, TypeError):
                # Keras 3 only reloads SavedModels through TFSMLayer, which exposes no layers
                # to take Grad-CAM from; say so rather than failing later.
                raise BiasscopeError(
                    f"{path}: this SavedModel has no Keras layers Keras 3 can rebuild; "
                    "save the model as .keras (model.save('model.keras')) and scan that"
                ) from None
        if not _looks_like_keras_file(path):
            raise BiasscopeError(f"not a Keras model file (.keras zip, .h5 or SavedModel folder): {path}")
        _import_hub_if_needed(path)
        return keras.models.load_model(path, safe_mode=not unsafe, compile=False)
    except BiasscopeError:
        raise
    except Exception as exc:  # keras raises many types for a broken file; one line for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise BiasscopeError(f"{path}: the model contains Lambda/custom code; "
                                 "pass --unsafe-model if you trust it") from None
        raise BiasscopeError(f"{path}: could not load the model ({msg[:200]})") from None


def model_fingerprint(model, path=None) -> str:
    """sha256 of the model file(s) when loaded from disk, else of the weights."""
    h = hashlib.sha256()
    if path is not None:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()
    for w in model.weights:
        h.update(w.path.encode() if hasattr(w, "path") else b"")
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def _is_model(layer) -> bool:
    keras = _keras()
    return isinstance(layer, keras.Model)


def _output_shape(layer):
    try:
        out = layer.output
    except (AttributeError, ValueError):
        return None
    if isinstance(out, (list, tuple)):
        return None
    try:
        return tuple(out.shape)
    except Exception:
        return None


def _children(layer) -> list:
    """Sublayers to look into: a nested model's layers, or a composite layer's tracked sublayers
    (keras-hub's ``ViTEncoder`` keeps its blocks inside one layer). The inside of an attention
    layer (its query/key/value projections) is not a place to take a CAM from."""
    if _is_model(layer):
        return list(layer.layers)
    if "Attention" in type(layer).__name__:
        return []
    return [c for c in (getattr(layer, "_layers", None) or []) if hasattr(c, "call")]


def iter_layers(model, prefix: str = ""):
    """Yield (path, layer) for every layer, descending into nested models and composite layers.

    Nested models are not yielded themselves; a composite layer is yielded before its sublayers.
    """
    seen: set = set()

    def walk(parent, prefix):
        for layer in _children(parent):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            path = f"{prefix}{layer.name}"
            if not _is_model(layer):
                yield path, layer
            yield from walk(layer, f"{path}/")

    yield from walk(model, prefix)


def _shape_of(out):
    if isinstance(out, (list, tuple, dict)) or not hasattr(out, "shape"):
        return None
    try:
        return tuple(None if d is None else int(d) for d in out.shape)
    except (TypeError, ValueError):
        return None


@contextlib.contextmanager
def _wrapped_calls(layers, wrap):
    """Replace each layer's ``call`` by ``wrap(layer, original_call)`` for the duration, then
    restore it. A layer already wrapped (a capture in progress) is left alone."""
    done = []
    try:
        for layer in layers:
            if "call" not in vars(layer):
                layer.call = wrap(layer, layer.call)
                done.append(layer)
        yield
    finally:
        for layer in done:
            delattr(layer, "call")


@dataclass
class _Probe:
    order: list         # (path, layer, output shape) in the order the calls finished
    passes_on: dict     # id(composite) -> id of the sublayer whose output it returns as it is


def _probe(model, input_shape) -> _Probe:
    """Run the model once on a zero image with every layer's ``call`` wrapped, to learn each
    layer's output shape and the order in which the layers run (the only way to see inside
    composite layers, whose sublayers have no symbolic output)."""
    import numpy as np

    layers = [(p, l) for p, l in iter_layers(model) if type(l).__name__ != "InputLayer"]
    paths = {id(l): p for p, l in layers}
    finished: set = set()
    order, last_out, passes_on, stack = [], {}, {}, []

    def wrap(layer, orig):
        def call(*args, **kwargs):
            stack.append(id(layer))
            try:
                out = orig(*args, **kwargs)
            finally:
                stack.pop()
            child = last_out.pop(id(layer), None)
            if child is not None and child[1] is out:
                passes_on.setdefault(id(layer), child[0])
            if stack:
                last_out[stack[-1]] = (id(layer), out)
            if id(layer) not in finished:
                finished.add(id(layer))
                order.append((paths[id(layer)], layer, _shape_of(out)))
            return out
        return call

    try:
        with _wrapped_calls([l for _, l in layers], wrap):
            model(np.zeros((1, *input_shape), np.float32), training=False)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BiasscopeError(f"model {model.name!r} does not run on a {'x'.join(map(str, input_shape))} "
                             f"input ({msg[:200]})") from None
    return _Probe(order, passes_on)


MAX_EXTRA_TOKENS = 8


def token_grid(n_tokens: int, image_hw: tuple, grid_hint: tuple | None = None):
    """(extra, h, w) for T tokens: T = extra + h * w, extra <= 8, the grid following the patch
    grid seen before the tokens when there is one, else the image's aspect ratio; None if none."""
    if grid_hint is not None:
        extra = n_tokens - grid_hint[0] * grid_hint[1]
        if 0 <= extra <= MAX_EXTRA_TOKENS:
            return extra, int(grid_hint[0]), int(grid_hint[1])
    H, W = image_hw
    for extra in range(0, MAX_EXTRA_TOKENS + 1):
        n = n_tokens - extra
        if n < 1:
            break
        for h in range(1, n + 1):
            if n % h == 0 and h * W == (n // h) * H:
                return extra, h, n // h
    return None


def _patch_conv(layer):
    """(ph, pw) of a patchify conv (kernel == strides > 1), else None."""
    kernel, strides = getattr(layer, "kernel_size", None), getattr(layer, "strides", None)
    if kernel is None or strides is None or tuple(kernel) != tuple(strides) or max(strides) < 2:
        return None
    return tuple(int(s) for s in strides)


def target_layers(model, input_shape: tuple | None = None) -> list[LayerInfo]:
    """Every layer a CAM can be taken from, in the order the layers run: spatial (4-D) layers and
    token (3-D) layers whose tokens form a patch grid, inside nested models and composite layers.

    Found by one forward pass on a zero image of ``input_shape`` (H, W, C) or the model's own
    input shape. A model accepting any image size with no ``input_shape`` is listed from its
    symbolic outputs instead (nested models only, no token grids).
    """
    if input_shape is None:
        shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else ()
        if len(shape) == 4 and all(d is not None for d in shape[1:]):
            input_shape = tuple(int(d) for d in shape[1:])
    if input_shape is None:
        return _symbolic_spatial_layers(model)
    probe = _probe(model, input_shape)
    by_id = {id(layer): layer for _, layer, _ in probe.order}

    def trivial(layer, depth=0) -> bool:
        """A norm/dropout-like layer, or a composite returning such a sublayer's output as is."""
        if type(layer).__name__ in _TRIVIAL:
            return True
        inner = probe.passes_on.get(id(layer))
        return inner is not None and depth < 64 and trivial(by_id[inner], depth + 1)

    out: list[LayerInfo] = []
    hint, patch, patch_layer = None, (), ""
    for path, layer, shape in probe.order:
        if shape is None:
            continue
        name = type(layer).__name__
        if len(shape) == 4:
            out.append(LayerInfo(path, name, tuple(shape[1:]), layer))
            hint = (shape[1], shape[2])
            if _patch_conv(layer) is not None:
                patch, patch_layer = _patch_conv(layer), path
        elif len(shape) == 3 and shape[1] is not None and shape[2] is not None:
            grid = token_grid(shape[1], input_shape[:2], hint)
            if grid is not None and grid[1] * grid[2] > 1:
                extra, h, w = grid
                out.append(LayerInfo(path, name, (h, w, shape[2]), layer, n_tokens=shape[1],
                                     extra=extra, patch=patch, patch_layer=patch_layer,
                                     trivial=trivial(layer)))
    return out


def _symbolic_spatial_layers(model) -> list[LayerInfo]:
    out = []
    for path, layer in iter_layers(model):
        if type(layer).__name__ == "InputLayer":
            continue
        shape = _output_shape(layer)
        if shape is not None and len(shape) == 4:
            out.append(LayerInfo(path, type(layer).__name__, tuple(shape[1:]), layer))
    return out


def _n_outputs(model) -> int:
    shape = model.outputs[0].shape if getattr(model, "outputs", None) else None
    if shape is None or len(shape) != 2 or shape[-1] is None:
        raise BiasscopeError(f"model {model.name!r}: expected one (batch, n_classes) output, got "
                             f"{None if shape is None else tuple(shape)}")
    return int(shape[-1])


def choose_layer(model, candidates: list[LayerInfo] | None = None, *,
                 input_shape: tuple | None = None) -> LayerInfo:
    """The automatic CAM target.

    For a CNN: the last spatial layer that still has a spatial extent, skipping 1x1-resolution
    layers (global-pooled heads kept 4-D, as in MobileNetV3) and 1x1 "conv logits" layers whose
    filters equal the number of outputs, with the activations that follow them.

    For a token model (a token layer runs after the last usable spatial layer): the last token
    layer, norms and the like passed over, whose patch tokens receive gradient from the class
    scores. With a pooling head that is the last transformer block's output; with a head that
    reads only the CLS token, whose patch tokens after the last attention get no gradient, it is
    the input of the last block (the output of the one before).
    """
    if candidates is None:
        candidates = target_layers(model, input_shape)
    n_out = _n_outputs(model)
    usable, in_logits = [], False
    order = {info.path: i for i, info in enumerate(candidates)}
    for info in candidates:  # forward order: activations inherit the state of what feeds them
        if info.is_tokens:
            continue
        kernel = getattr(info.layer, "kernel_size", None)
        if kernel is not None and tuple(kernel) == (1, 1) and getattr(info.layer, "filters", None) == n_out:
            in_logits = True
        elif info.class_name not in _PASS_THROUGH:
            in_logits = False
        if not in_logits and info.spatial > 1:
            usable.append(info)
    tokens = [info for info in candidates if info.is_tokens and not info.trivial]
    if tokens and (not usable or order[tokens[-1].path] > order[usable[-1].path]):
        shape = input_shape or tuple(int(d) for d in model.inputs[0].shape[1:])
        reach = gradient_reach(model, tokens, shape)
        for info, r in zip(reversed(tokens), reversed(reach)):
            if r > 0:
                return info
        raise BiasscopeError(f"model {model.name!r}: no token layer's patch tokens receive gradient "
                             "from the class scores; name a layer with --layer or use --method eigencam")
    if usable:
        return usable[-1]
    raise BiasscopeError(f"model {model.name!r} has no layer with a spatial (H, W > 1) output or "
                         "patch-grid tokens to take a CAM from; name one with --layer "
                         "(see `biasscope layers MODEL`)")


def gradient_reach(model, infos: list[LayerInfo], input_shape: tuple) -> list[float]:
    """For each layer, the largest |d score / d A| over its patch grid (extra tokens dropped),
    the score being each image's top output, on two fixed random images: 0 where the outputs
    do not depend on the grid (a CLS-token head after the last attention, a side branch)."""
    import numpy as np

    from ._tf import import_tf

    tf = import_tf()
    outs: dict = {}  # id(layer) -> its output, watched

    def wrap(layer, orig):
        def call(*args, **kwargs):
            out = orig(*args, **kwargs)
            tape.watch(out)
            outs[id(layer)] = out
            return out
        return call

    with tf.GradientTape(watch_accessed_variables=False) as tape, \
            _wrapped_calls([info.layer for info in infos], wrap):
        x = np.random.default_rng(0).uniform(0, 255, (2, *input_shape)).astype(np.float32)
        score = tf.reduce_sum(tf.reduce_max(tf.cast(model(x, training=False), tf.float32), axis=-1))
    keys = list(outs)
    grads = dict(zip(keys, tape.gradient(score, [outs[k] for k in keys])))  # one backward pass
    return [0.0 if grads.get(id(info.layer)) is None
            else float(tf.reduce_max(tf.abs(info.as_grid(grads[id(info.layer)])))) for info in infos]


def find_layer(model, name: str, candidates: list[LayerInfo] | None = None, *,
               input_shape: tuple | None = None) -> LayerInfo:
    """Resolve ``--layer NAME``: a nested path (``base/conv``, ``vit/vit_encoder/block_2``) or
    a unique plain layer name."""
    all_layers = list(iter_layers(model))
    exact = [(p, l) for p, l in all_layers if p == name]
    if not exact:
        exact = [(p, l) for p, l in all_layers if p.rsplit("/", 1)[-1] == name]
    if len(exact) > 1:
        raise BiasscopeError(f"layer name {name!r} is ambiguous: {', '.join(p for p, _ in exact[:6])}"
                             f"{' ...' if len(exact) > 6 else ''}; give the nested path")
    if not exact:
        names = [p for p, _ in all_layers] + [p.rsplit("/", 1)[-1] for p, _ in all_layers]
        near = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(dict.fromkeys(near))}?" if near else ""
        raise BiasscopeError(f"model {model.name!r} has no layer {name!r}{hint}")
    path, layer = exact[0]
    if candidates is None:
        candidates = target_layers(model, input_shape)
    for info in candidates:
        if info.layer is layer:
            return info
    shape = next((shp for p, l, shp in _probe(model, input_shape).order if l is layer), None) \
        if input_shape is not None else _output_shape(layer)
    if shape is not None and len(shape) == 3 and input_shape is not None:
        raise BiasscopeError(
            f"layer {path!r} has {shape[1]} tokens, which are not a patch grid of the "
            f"{input_shape[0]}x{input_shape[1]} input after dropping up to {MAX_EXTRA_TOKENS} extra "
            "tokens; choose a layer whose tokens are the patches (see `biasscope layers MODEL`)")
    raise BiasscopeError(f"layer {path!r} has output shape {shape}, neither (batch, H, W, C) nor "
                         "(batch, tokens, D); a CAM needs a spatial or token layer")


def _producer(model):
    """The layer that produces the model's (first) output, descending into nested models."""
    layer = None
    hist = getattr(model.outputs[0], "_keras_history", None) if getattr(model, "outputs", None) else None
    if hist is not None:
        layer = hist[0]
    if layer is None:
        layer = model.layers[-1]
    if _is_model(layer):
        return _producer(layer)
    return layer


def _activation_name(fn) -> str:
    return getattr(fn, "__name__", "") if fn is not None else ""


def output_head(model) -> OutputHead:
    """Find where the pre-softmax/sigmoid scores are and which activation closes the model."""
    n_out = _n_outputs(model)
    layer = _producer(model)
    cls = type(layer).__name__
    act = _activation_name(getattr(layer, "activation", None))
    if cls == "Softmax":
        return OutputHead("softmax", layer, "call", n_out)
    if cls == "Activation":
        if act in ("softmax", "sigmoid"):
            return OutputHead(act, layer, "call", n_out)
        return OutputHead("linear", layer, "none", n_out)
    if act in ("softmax", "sigmoid"):
        return OutputHead(act, layer, "activation", n_out)
    return OutputHead("linear", layer, "none", n_out)


class Capture:
    """Temporarily wrap the target layer and the output head to record A and the scores.

    Used *inside* the function being traced, so the wrapped calls become part of the graph and
    the model object is restored before anything else sees it. ``tape.watch`` is applied to A
    as soon as it exists, so only the head (A -> scores) is recorded for the backward pass.
    """

    def __init__(self, target: LayerInfo, head: OutputHead, tape=None):
        self.target, self.head, self.tape = target, head, tape
        self.raw = None          # the layer's output as it is: (B, T, D) for a token layer
        self.activations = None  # ... as a grid (B, h, w, C)
        self.scores = None

    def __enter__(self):
        layer = self.target.layer
        orig_call = layer.call

        def call(*args, **kwargs):
            out = orig_call(*args, **kwargs)
            if self.tape is not None:
                self.tape.watch(out)
            self.raw = out
            self.activations = self.target.as_grid(out)
            return out

        layer.call = call
        self._restore = [lambda: delattr(layer, "call")]
        head = self.head
        if head.via == "activation":
            orig_act = head.layer.activation

            def act(z):
                self.scores = z
                return orig_act(z)

            head.layer.activation = act
            self._restore.append(lambda: setattr(head.layer, "activation", orig_act))
        elif head.via == "call":
            hcall = head.layer.call

            def capture_input(x, *args, **kwargs):
                self.scores = x
                return hcall(x, *args, **kwargs)

            head.layer.call = capture_input
            self._restore.append(lambda: delattr(head.layer, "call"))
        return self

    def as_grid(self, t):
        """A tensor shaped like the layer's output (its gradient) as a grid, like ``activations``."""
        return self.target.as_grid(t)

    def __exit__(self, *exc):
        for undo in reversed(self._restore):
            undo()
        return False
