"""``biasscope demo``: build the bias benchmark, train its small CNN (cached), scan it.

The benchmark has planted, known flaws (classes learnt from their background, flipped labels;
see :mod:`biasscope.benchmark`), so a newcomer sees biasscope measure a real shortcut within
minutes of installing it, with nothing downloaded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .progress import as_reporter


def default_cache_dir() -> Path:
    """``datasets/generated`` in a checkout (the folder exists there), else the user cache."""
    here = Path("datasets")
    if here.is_dir():
        return here / "generated"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "biasscope"


def run_demo(out="reports/demo", *, size: str = "default", cache_dir=None, retrain: bool = False,
             progress=True) -> dict:
    """Build/reuse the benchmark and model, scan the validation split into ``out``.

    Returns a dict with the scan, the model's accuracy against the benchmark's ground truth
    (average and worst (class, background) group) and the timings of each step.
    """
    from . import benchmark
    from ._tf import import_tf
    from .api import scan

    import_tf()  # before the benchmark's own Keras import, so start-up noise stays silent
    rep = as_reporter(progress)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = cache / f"bias-benchmark-{size}"
    timings = {}

    t = time.perf_counter()
    with rep.task("building the bias benchmark", total=None, unit="step"):
        benchmark.build_benchmark(data, size=size)
    timings["build_s"] = time.perf_counter() - t

    t = time.perf_counter()
    epochs = benchmark.default_epochs(size)
    with rep.task("training the demo CNN", total=epochs, unit="epoch") as task:
        trained = []

        def on_epoch(epoch, logs):
            trained.append(logs)
            task.advance(1)

        model = benchmark.train_demo_model(data, force=retrain, progress=on_epoch)
        if not trained:
            task.update(completed=epochs, description="demo CNN: reused the cached model")
    timings["train_s"] = time.perf_counter() - t

    truth_eval = benchmark.evaluate_groups(model, data)
    t = time.perf_counter()
    # the demo's folder is its own: a scan left there by an older version is replaced
    result = scan(model, data / "val", out=out, batch_size=32, overwrite=True, progress=rep)
    timings["scan_s"] = time.perf_counter() - t
    return {"scan": result, "data": data, "model": model, "truth_eval": truth_eval,
            "timings": timings}
