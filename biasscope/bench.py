"""``biasscope bench``: scan throughput as a ratio to a compiled forward pass, in one run.

The physical limit of Grad-CAM is about one forward pass (the backward pass only runs through
the head), so the figure that matters is ``scan from disk / compiled forward over the same
decoded images``. The per-image keras.io recipe (the project's seed article) is timed on a small
sample for comparison. Peak RSS is read right after the scan, before the baseline holds the
decoded images in memory, so it measures the scan's streaming footprint.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import BiasscopeError
from .progress import as_reporter


def reference_gradcam(img_array, model, last_conv_layer_name, pred_index=None):
    """The per-image recipe of the seed article (keras.io), kept verbatim in substance.

    The caller removes the final softmax first (``model.layers[-1].activation = None``), as the
    recipe does. Returns the max-normalised heatmap.
    """
    import keras
    import tensorflow as tf

    grad_model = keras.models.Model(
        model.inputs, [model.get_layer(last_conv_layer_name).output, model.output])
    with tf.GradientTape() as tape:
        last_conv_layer_output, preds = grad_model(img_array)
        if pred_index is None:
            pred_index = tf.argmax(preds[0])
        class_channel = preds[:, pred_index]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    last_conv_layer_output = last_conv_layer_output[0]
    heatmap = last_conv_layer_output @ pooled_grads[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def synth_image_set(root: Path, n: int, n_classes: int, size: tuple, *, seed: int = 0) -> Path:
    """n JPEG images in n_classes folders with PNG masks: smooth noise plus a bright blob."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[:H, :W]
    base = rng.integers(0, 255, (16, H // 8 + 1, W // 8 + 1, 3)).astype(np.uint8)
    for i in range(n):
        c = i % n_classes
        (root / "images" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        (root / "masks" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        img = np.asarray(Image.fromarray(base[i % 16]).resize((W, H), Image.BILINEAR)).copy()
        cy, cx = rng.integers(H // 4, 3 * H // 4), rng.integers(W // 4, 3 * W // 4)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= (min(H, W) // 6) ** 2
        img[m] = rng.integers(150, 255, 3)
        Image.fromarray(img).save(root / "images" / f"c{c:03d}" / f"{i:06d}.jpg", quality=90)
        Image.fromarray((m * 255).astype(np.uint8)).save(root / "masks" / f"c{c:03d}" / f"{i:06d}.png")
    return root


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_arch(arch: str, image_size: tuple, n_classes: int = 10):
    import keras

    builder = getattr(keras.applications, arch, None)
    if builder is None or not callable(builder):
        raise BiasscopeError(f"--arch {arch!r} is not a keras.applications architecture")
    return builder(weights=None, input_shape=(*image_size, 3), classes=n_classes)


def run_bench(model=None, *, arch: str | None = None, n: int = 512, batch_size: int = 16,
              image_size=(224, 224), recipe_sample: int = 8, repeats: int = 2,
              preprocess="none", workdir=None, progress=True, methods=("gradcam",),
              scorecam_channels=(32,)) -> dict:
    """Time scan-from-disk with each CAM method and the per-image recipe against a compiled
    forward pass over the same images, in one run.

    ``methods``: names from :data:`biasscope.methods.METHOD_NAMES` (``"all"`` for every one);
    Score-CAM is timed once per value of ``scorecam_channels``. The first method's figures are
    also the top-level ``scan_s``/``scan_over_forward``; every method's are under ``methods``.
    """
    from .api import _input_geometry, _load_model, scan
    from .cams import compiled_forward
    from .methods import METHOD_NAMES, check_method
    from .model import choose_layer, output_head

    rep = as_reporter(progress)
    if (model is None) == (arch is None):
        raise BiasscopeError("bench needs a MODEL path or --arch NAME (one of them)")
    if n < batch_size:
        raise BiasscopeError(f"--n ({n}) must be at least --batch-size ({batch_size})")
    methods = list(METHOD_NAMES) if "all" in methods else list(dict.fromkeys(methods))
    runs = []  # (label, method, options)
    for m in methods:
        for ch in (scorecam_channels if m == "scorecam" else (None,)):
            opts = check_method(m, 32 if ch is None else ch)
            runs.append((m if ch is None else f"{m} (N={ch})", m, opts))
    kmodel = build_arch(arch, image_size) if arch else _load_model(model, False)[0]
    H, W, C = _input_geometry(kmodel, None if not arch else image_size)
    head = output_head(kmodel)
    target = choose_layer(kmodel, input_shape=(H, W, C))
    work = Path(tempfile.mkdtemp(prefix="biasscope-bench-", dir=workdir))
    timed: dict = {}
    try:
        with rep.task("writing images", total=None):
            n_cls = min(head.n_classes, n)
            data = synth_image_set(work / "data", n, n_cls, (H, W))
            os.sync()  # flush the new files now, not while the scan is being timed
        # the class map lets a model with more outputs than the sample has classes be scanned
        cmap = {f"c{c:03d}": c for c in range(n_cls)}
        for label, method, opts in runs:
            kw = dict(batch_size=batch_size, preprocess=preprocess, class_map=cmap, analysis=False,
                      method=method, **opts)
            # warm-up: trace the CAM engine on two batches (the engine is reused by the timed scan)
            scan(kmodel, data, out=work / "warm", limit=2 * batch_size, progress=False, **kw)
            shutil.rmtree(work / "warm")
            scan_times = []
            for r in range(max(1, repeats)):  # best of `repeats`, as for the baseline
                t = time.perf_counter()
                # the CAM pass to the stored result; analysis is timed by its own figures
                result = scan(kmodel, data, out=work / f"scan{r}", progress=progress, **kw)
                scan_times.append(time.perf_counter() - t)
                shutil.rmtree(work / f"scan{r}")
            timed[label] = {"method": method, **opts, "scan_s": min(scan_times), "scan_runs_s": scan_times,
                            "traces": result.meta["timings"]["traces"]}
        rss_scan = _peak_rss_mb()

        # baseline: the compiled forward pass over the same decoded images, already in memory
        files = sorted((data / "images").rglob("*.jpg"))
        images = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
        if C == 1:
            images = images.mean(axis=-1, keepdims=True)
        pad = (-len(images)) % batch_size
        batches = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        batches = batches.reshape(-1, batch_size, *images.shape[1:])
        forward = compiled_forward(kmodel, batch_size=batch_size, input_shape=(H, W, C),
                                   preprocess=preprocess)
        forward(batches[0])
        fwd_times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            for b in batches:
                forward(b).numpy()
            fwd_times.append(time.perf_counter() - t)
        forward_s = min(fwd_times)

        recipe = _time_recipe(kmodel, target, images[:recipe_sample]) \
            if recipe_sample and "gradcam" in methods else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for fig in timed.values():
        fig["scan_img_s"] = n / fig["scan_s"]
        fig["scan_over_forward"] = fig["scan_s"] / forward_s
    first = timed[runs[0][0]]
    out = {
        "model": arch or str(model), "n": n, "batch_size": batch_size, "image_size": [H, W],
        "layer": target.path, "layer_output": target.describe(), "device": _device(),
        "forward_s": forward_s, "forward_img_s": n / forward_s,
        "method": runs[0][0], "scan_s": first["scan_s"], "scan_img_s": first["scan_img_s"],
        "scan_over_forward": first["scan_over_forward"],
        "forward_runs_s": fwd_times, "scan_runs_s": first["scan_runs_s"], "peak_rss_mb_after_scan": rss_scan,
        "gradcam_traces": first["traces"], "methods": timed,
    }
    if recipe is not None:
        per_image, err = recipe
        out["recipe_per_image_s"] = per_image
        out["recipe_over_forward"] = (per_image * n / forward_s) if per_image else None
        if err:
            out["recipe_error"] = err
    return out


def _time_recipe(kmodel, target, sample):
    """Seconds per image of the seed recipe, or (None, reason) where it cannot run."""
    if "/" in target.path:
        return None, "the per-image recipe cannot reach a layer inside a nested model"
    last = kmodel.layers[-1]
    saved = getattr(last, "activation", None)
    try:
        if saved is not None:
            last.activation = None
        with warnings.catch_warnings():
            # the recipe calls a Functional model with a bare tensor; Keras warns about that
            warnings.simplefilter("ignore", UserWarning)
            reference_gradcam(sample[:1], kmodel, target.path)  # first call builds the graph
            times = []
            for i in range(len(sample)):
                t = time.perf_counter()
                reference_gradcam(sample[i:i + 1], kmodel, target.path)
                times.append(time.perf_counter() - t)
        return statistics.median(times), None
    finally:
        if saved is not None:
            last.activation = saved


def _device() -> str:
    from ._tf import import_tf

    tf = import_tf()  # quietly: the analysis bench has not imported it yet
    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else f"CPU ({os.cpu_count()} cores)"


def run_whole_job(n: int = 10_000, *, batch_size: int = 32, cache_dir=None, workdir=None,
                  progress=True) -> dict:
    """The whole job a user waits for -- ``scan`` with the CAM pass, the counterfactual tests,
    the analysis, the findings and the report -- on ``n`` images of the built-in benchmark's
    validation split (its 800 images repeated, with their masks and attributes) with the demo
    model, each stage as a ratio to the CAM pass of the same run."""
    import csv

    from . import benchmark
    from .api import scan
    from .demo import default_cache_dir

    rep = as_reporter(progress)
    if n < 1:
        raise BiasscopeError(f"--n must be >= 1, got {n}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data = cache / "bias-benchmark-default"
    with rep.task("building the bias benchmark", total=None, unit="step"):
        benchmark.build_benchmark(data, size="default")
    with rep.task("training the demo CNN (cached after the first time)", total=None, unit="step"):
        model = benchmark.train_demo_model(data)
    val = data / "val"
    with open(val / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    work = Path(tempfile.mkdtemp(prefix="biasscope-wholejob-", dir=workdir))
    try:
        manifest = work / "manifest.csv"
        with open(manifest, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for i in range(n):
                r = dict(rows[i % len(rows)])
                r["path"] = str((val / r["path"]).resolve())
                if r.get("mask"):
                    r["mask"] = str((val / r["mask"]).resolve())
                w.writerow(r)
        t = time.perf_counter()
        result = scan(model, manifest, out=work / "scan", batch_size=batch_size, progress=rep)
        total_s = time.perf_counter() - t
        rss = _peak_rss_mb()
        meta_t = result.meta.get("timings", {})
        ana_t = (result.analysis or {}).get("timings", {})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pass_s = float(meta_t["gradcam_pass_s"])
    stages = {"setup_s": float(meta_t["setup_s"]),  # data, model hash, layers, trace
              "cam_pass_s": pass_s,
              "assemble_s": float(meta_t["assemble_s"]),  # chunks joined into the stored table
              "counterfactuals_s": float(ana_t.get("counterfactuals_s", 0.0)),
              "occlusion_s": float(ana_t.get("occlusion_s", 0.0)),
              # the clusters and 2-D map run alongside the counterfactual pass: what they add
              # to the wall clock is the wait for them after it
              "analysis_s": float(ana_t.get("analysis_after_counterfactuals_s", ana_t.get("analysis_s", 0.0))),
              "findings_s": float(ana_t.get("findings_s", 0.0)),
              "report_s": float(meta_t.get("report_s", 0.0))}
    stages["rest_s"] = max(0.0, total_s - sum(stages.values()))  # table and JSON writes, loads
    alongside = {"analysis_s": float(ana_t["analysis_s"])} if "analysis_after_counterfactuals_s" in ana_t else {}
    return {"n": n, "batch_size": batch_size, "device": _device(), "total_s": total_s,
            "total_over_pass": total_s / pass_s, "peak_rss_mb": rss, "stages": stages,
            "over_pass": {k[:-2]: v / pass_s for k, v in stages.items()},
            "alongside_counterfactuals": alongside}


def synthetic_scan_table(n: int, *, seed: int = 0, n_classes: int = 4, hw: int = 7):
    """A scan-like table and (n, hw, hw) float16 heatmaps for timing the analysis at any n:
    each predicted class attends to one of three class-specific spots plus noise; 80% correct;
    an attribute ``background`` with three values."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    classes = np.array([f"c{c}" for c in range(n_classes)])
    lab = rng.integers(0, n_classes, n)
    pred = np.where(rng.random(n) < 0.8, lab, rng.integers(0, n_classes, n))
    yy, xx = np.mgrid[:hw, :hw]
    spots = rng.integers(1, hw - 1, (n_classes, 3, 2))
    which = rng.integers(0, 3, n)
    heat = np.empty((n, hw, hw), np.float16)
    for i in range(0, n, 100_000):  # bounded temporaries
        sl = slice(i, i + 100_000)
        cy, cx = spots[pred[sl], which[sl], 0], spots[pred[sl], which[sl], 1]
        h = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 2.0)
        heat[sl] = h + 0.2 * rng.random(h.shape)
    table = pd.DataFrame({"path": [f"images/{i}.png" for i in range(n)], "label": classes[lab],
                          "pred": classes[pred], "correct": lab == pred,
                          "inside_frac": rng.random(n), "lift": rng.random(n) * 2,
                          "pointing_hit": rng.random(n) < 0.5,
                          "background": rng.choice(["a", "b", "c"], n)})
    return table, heat, list(classes)


def run_analysis_bench(n: int, *, seed: int = 0) -> dict:
    """Seconds and peak RSS of :func:`biasscope.analysis.analyse` (clusters, 2-D map, class
    and group statistics) on ``n`` synthetic rows."""
    from .analysis import analyse

    if n < 1:
        raise BiasscopeError(f"--n must be >= 1, got {n}")
    table, heat, classes = synthetic_scan_table(n, seed=seed)
    rss0 = _peak_rss_mb()
    t = time.perf_counter()
    _, info = analyse(table, heat, seed=seed, classes=classes, attributes=["background"])
    return {"n": n, "analysis_s": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb(),
            "peak_rss_mb_before": rss0, "n_clusters": len(info["clusters"]),
            "projection": info.get("projection"), "device": _device()}
