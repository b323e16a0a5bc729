"""Import TensorFlow quietly.

TensorFlow's C++ runtime prints INFO lines (oneDNN, missing CUDA drivers) to file descriptor 2
at import time, before its own log level applies; on a CPU machine they read like errors. They
are silenced for the import only; a failing import still raises with its Python message.
"""

from __future__ import annotations

import contextlib
import gc
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


#: Set by the command line: once TensorFlow is imported, its objects are moved out of the
#: cyclic garbage collector's view (:func:`gc.freeze`). A process-wide choice, so a library
#: user (a notebook) does not get it.
FREEZE_AFTER_IMPORT = False

#: Set by the command line: packages that TensorFlow and Keras import only if they are
#: installed, for features the command line never uses (``keras.visualization``'s Matplotlib
#: and OpenCV plots, ``keras.wrappers``' scikit-learn estimators, the legacy ``tf.keras``
#: training loop's SciPy sparse inputs). They are hidden while TensorFlow loads (an import of
#: them fails, as if they were not installed) and visible again after, so a later import of
#: them works. On 2 cores with all of them installed, TensorFlow's import takes 1.5-1.7 s
#: instead of 2.4-2.5 s. The command line's own scikit-learn and SciPy work (the analysis,
#: the findings) runs in its helper process (:mod:`biasscope.helper`), which imports them on
#: its own.
HIDE_DURING_IMPORT: tuple = ()


@contextlib.contextmanager
def _hidden(names):
    """``names`` (top-level packages not imported yet) unimportable inside the block."""
    hidden = [n for n in names if n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError
    try:
        yield
    finally:
        for n in hidden:
            if n in sys.modules and sys.modules[n] is None:
                del sys.modules[n]


@contextlib.contextmanager
def _no_gc():
    """The cyclic garbage collector off for the import: TensorFlow's import creates about a
    million long-lived objects and no garbage to speak of, and the full collections that
    allocation triggers cost 0.6 s of it on 2 cores."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def import_tf():
    """Return the ``tensorflow`` module, imported once with start-up noise silenced."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _quiet_fd2(), _no_gc(), _hidden(HIDE_DURING_IMPORT):
        import tensorflow as tf
        import keras  # noqa: F401  (its import pulls in the same runtime)

        tf.config.list_physical_devices()  # device discovery prints the CUDA message
    if FREEZE_AFTER_IMPORT:
        # every later full collection would walk those objects again (0.26 s each, twice
        # in a 10,000-image scan after the pass)
        gc.freeze()
    return tf
