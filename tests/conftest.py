"""Shared fixtures: tiny generated image sets and tiny Keras models (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CLASSES = ("circle", "square", "stripe")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: no error where xdist is not loaded
def pytest_xdist_make_scheduler(config, log):
    """Work units for ``pytest -n`` (pytest-xdist, ``--dist loadscope``): a test module runs on
    one worker, so its module- and session-scoped fixtures (trained models, scans, a Ray) are
    built once; the zoo's end-to-end tests are split by case (a case's model and scan are built
    once, on the worker that runs that case's tests). ``xdist_group`` marks would say the same,
    but pytest 9.2 ignores the node ids pytest-xdist 3.8 rewrites for them."""
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleAndZooCase(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module, _, test = nodeid.partition("::")
            if module.endswith("test_zoo_findings.py") and "[" in test:
                # test[texture] or test[clean_flips-0.9-0.9]: the case is the first parameter
                return f"{module}[{test.split('[', 1)[1].rstrip(']').split('-')[0]}]"
            return module

    return ByModuleAndZooCase(config, log)


def kill_once_stored(code: str, args, marker: Path, timeout: float = 120.0) -> None:
    """Run ``python -c code *args`` (a scan), SIGKILL it as soon as ``marker`` (a stored chunk)
    exists, and check that it was indeed killed, not finished."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the scan finished before it could be interrupted"


def make_image_set(root: Path, *, n_per_class: int = 6, size: int = 32, seed: int = 0,
                   masks: bool = True, classes=CLASSES) -> Path:
    """DATA/images/<class>/*.png + DATA/masks/<class>/*.png: a bright shape on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ci, cls in enumerate(classes):
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        if masks:
            (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            r = size // 5
            cy, cx = rng.integers(r, size - r, 2)
            if ci % 3 == 0:
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif ci % 3 == 1:
                m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            else:
                m = (abs(yy - cy) <= r // 2) & (abs(xx - cx) <= r * 2 - 1)
            img[m] = (200 + 50 * np.eye(3)[ci % 3]).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / cls / f"{cls}_{i:03d}.png")
            if masks:
                Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / cls / f"{cls}_{i:03d}.png")
    return root


def make_cnn(n_classes: int = 3, size: int = 32, *, activation="softmax", seed: int = 0):
    """A small functional CNN: 0..255 input, conv blocks, GAP, Dense(activation)."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="last_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(n_classes, activation=activation, name="head")(x)
    return keras.Model(inp, out, name="tiny_cnn")


def make_vit(n_classes: int = 3, size: int | None = 32, *, patch: int = 8, dim: int = 16,
             blocks: int = 2, seed: int = 0):
    """A small functional ViT with a pooling head: 0..255 input, a patchify conv, Reshape to
    tokens, pre-norm attention blocks (outputs ``block<i>_out``), a final norm, token mean,
    Dense(softmax). ``size=None`` accepts any image size."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(dim, patch, strides=patch, name="patch_embed")(x)
    x = keras.layers.Reshape((-1, dim), name="tokens")(x)
    for i in range(1, blocks + 1):
        y = keras.layers.LayerNormalization(name=f"block{i}_ln1")(x)
        y = keras.layers.MultiHeadAttention(2, dim // 2, name=f"block{i}_mha")(y, y)
        x = keras.layers.Add(name=f"block{i}_add1")([x, y])
        y = keras.layers.LayerNormalization(name=f"block{i}_ln2")(x)
        y = keras.layers.Dense(2 * dim, activation="gelu", name=f"block{i}_mlp1")(y)
        y = keras.layers.Dense(dim, name=f"block{i}_mlp2")(y)
        x = keras.layers.Add(name=f"block{i}_out")([x, y])
    x = keras.layers.LayerNormalization(name="final_ln")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="tiny_vit")


@pytest.fixture
def image_set(tmp_path):
    return make_image_set(tmp_path / "data")


@pytest.fixture
def cnn_path(tmp_path):
    path = tmp_path / "model.keras"
    make_cnn().save(path)
    return path
