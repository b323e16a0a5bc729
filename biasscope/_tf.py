"""Import TensorFlow quietly.

TensorFlow's C++ runtime prints INFO lines (oneDNN, missing CUDA drivers) to file descriptor 2
at import time, before its own log level applies; on a CPU machine they read like errors. They
are silenced for the import only; a failing import still raises with its Python message.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def _quiet_fd2():
    if os.environ.get("BIASSCOPE_TF_VERBOSE"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. some notebook kernels)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tf():
    """Return the ``tensorflow`` module, imported once with start-up noise silenced."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet_fd2():
        import tensorflow as tf
        import keras  # noqa: F401  (its import pulls in the same runtime)

        tf.config.list_physical_devices()  # device discovery prints the CUDA message
    return tf
