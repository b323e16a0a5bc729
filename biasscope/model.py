"""Model handling: loading, target-layer discovery (inside nested models) and the output head.

Grad-CAM needs two tensors from one forward pass: the target layer's activations A and the class
scores *before* softmax/sigmoid. Building a second ``keras.Model`` for them breaks on the most
common transfer-learning shape, ``Sequential([base_model, GlobalAveragePooling2D(), Dense(...)])``:
the inner layer's symbolic output is not connected to the outer model's inputs. Instead we run the
model itself and *capture* both tensors while it runs (:class:`Capture`), which works for any
nesting depth and any graph, and leaves the model unchanged afterwards.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BiasscopeError

# Layers that carry no spatial computation of their own: when they follow a skipped
# "conv logits" head they are skipped with it.
_PASS_THROUGH = {"Activation", "ReLU", "Dropout", "SpatialDropout2D", "Softmax", "LeakyReLU",
                 "ELU", "PReLU", "Identity"}


@dataclass(frozen=True)
class LayerInfo:
    """A layer with a 4-D (batch, H, W, C) output, addressed by its nested path."""

    path: str           # "xception/block14_sepconv2_act" for a layer inside a nested model
    class_name: str
    shape: tuple        # (H, W, C)
    layer: object       # the keras layer itself

    @property
    def spatial(self) -> int:
        return int(self.shape[0] or 0) * int(self.shape[1] or 0)


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


def iter_layers(model, prefix: str = ""):
    """Yield (path, layer) for every layer, descending into nested models, in call order."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if _is_model(layer):
            yield from iter_layers(layer, prefix=f"{path}/")
        else:
            yield path, layer


def spatial_layers(model) -> list[LayerInfo]:
    """Every layer whose output is 4-D (batch, H, W, C), in call order."""
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


def choose_layer(model, candidates: list[LayerInfo] | None = None) -> LayerInfo:
    """The automatic Grad-CAM target: the last spatial layer that still has a spatial extent.

    Skips 1x1-resolution layers (global-pooled heads kept 4-D, as in MobileNetV3) and 1x1
    "conv logits" layers whose filters equal the number of outputs, with the activations that
    follow them.
    """
    candidates = spatial_layers(model) if candidates is None else candidates
    n_out = _n_outputs(model)
    usable, in_logits = [], False
    for info in candidates:  # forward order: activations inherit the state of what feeds them
        kernel = getattr(info.layer, "kernel_size", None)
        if kernel is not None and tuple(kernel) == (1, 1) and getattr(info.layer, "filters", None) == n_out:
            in_logits = True
        elif info.class_name not in _PASS_THROUGH:
            in_logits = False
        if not in_logits and info.spatial > 1:
            usable.append(info)
    if usable:
        return usable[-1]
    raise BiasscopeError(f"model {model.name!r} has no layer with a spatial (H, W > 1) output to take "
                         "Grad-CAM from; name one with --layer (see `biasscope layers MODEL`)")


def find_layer(model, name: str, candidates: list[LayerInfo] | None = None) -> LayerInfo:
    """Resolve ``--layer NAME``: a nested path (``base/conv``) or a unique plain layer name."""
    all_layers = list(iter_layers(model))
    exact = [(p, l) for p, l in all_layers if p == name]
    if not exact:
        exact = [(p, l) for p, l in all_layers if p.rsplit("/", 1)[-1] == name]
    if len(exact) > 1:
        raise BiasscopeError(f"layer name {name!r} is ambiguous: {', '.join(p for p, _ in exact)}; "
                             "give the nested path")
    if not exact:
        names = [p for p, _ in all_layers] + [p.rsplit("/", 1)[-1] for p, _ in all_layers]
        near = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(dict.fromkeys(near))}?" if near else ""
        raise BiasscopeError(f"model {model.name!r} has no layer {name!r}{hint}")
    path, layer = exact[0]
    shape = _output_shape(layer)
    if shape is None or len(shape) != 4:
        raise BiasscopeError(f"layer {path!r} has output shape {shape}, not (batch, H, W, C); "
                             "Grad-CAM needs a spatial layer")
    return LayerInfo(path, type(layer).__name__, tuple(shape[1:]), layer)


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
        self.activations = None
        self.scores = None

    def __enter__(self):
        layer = self.target.layer
        orig_call = layer.call

        def call(*args, **kwargs):
            out = orig_call(*args, **kwargs)
            if self.tape is not None:
                self.tape.watch(out)
            self.activations = out
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

    def __exit__(self, *exc):
        for undo in reversed(self._restore):
            undo()
        return False
