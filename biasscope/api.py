"""The Python API: ``biasscope.scan(model, data, **options) -> Scan`` and ``biasscope.load``.

Everything the CLI does is reachable from here; the CLI only parses options and prints.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
import errno
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.markup import escape

from . import __version__
from .data import BOX_COLS, Dataset, load_dataset
from .errors import BiasscopeError, ScanInterrupted
from .progress import as_reporter
from .store import (LOCK, SCHEMA_VERSION, ChunkWriter, Scan, ScanLock, load, read_meta, stored_rows,
                    write_json, write_table)

__all__ = ["scan", "load", "Scan", "list_layers"]

# files a scan writes; only these are ever removed when a scan directory is reused
_OWNED = ("meta.json", "scan.parquet", "heatmaps.npy", "heatmaps_true.npy", "analysis.json",
          "findings.json", "summary.json", "report.html", "chunks")


def _load_model(model, unsafe: bool):
    from .model import load_model

    if isinstance(model, (str, Path)):
        return load_model(model, unsafe=unsafe), Path(model)
    import keras

    if not isinstance(model, keras.Model):
        raise BiasscopeError(f"model must be a path or a keras.Model, got {type(model).__name__}")
    return model, None


def _input_geometry(model, image_size) -> tuple[int, int, int]:
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    if shape is None or len(shape) != 4:
        raise BiasscopeError(f"model {model.name!r}: expected one image input (batch, H, W, C), got {shape}")
    _, h, w, c = shape
    if c not in (1, 3):
        raise BiasscopeError(f"model {model.name!r}: input has {c} channels; biasscope feeds 1 or 3")
    if image_size is not None:
        ih, iw = (int(s) for s in image_size)
        if (h is not None and h != ih) or (w is not None and w != iw):
            raise BiasscopeError(f"--image-size {ih} {iw} does not match the model's input {h}x{w}")
        h, w = ih, iw
    if h is None or w is None:
        raise BiasscopeError(f"model {model.name!r} accepts any image size; pass --image-size H W")
    return int(h), int(w), int(c)


def list_layers(model, *, unsafe_model: bool = False, image_size=None) -> tuple[list, object]:
    """(candidates, automatic choice) for ``biasscope layers``: spatial and token layers."""
    from .model import choose_layer, target_layers

    m, _ = _load_model(model, unsafe_model)
    shape = None
    try:
        shape = _input_geometry(m, image_size)
    except BiasscopeError:
        if image_size is not None:
            raise  # a size that does not fit the model; without one, list what can be seen
    cands = target_layers(m, shape)
    try:
        auto = choose_layer(m, cands, input_shape=shape)
    except BiasscopeError:
        auto = None
    return cands, auto


def resolve_target(model, layer: str | None, method: str, geometry: tuple):
    """The target layer of a scan, checked against the input geometry and the method.

    A token layer's patch size must divide the image size, and a gradient method needs the
    class scores to depend on the layer's patch tokens (not so after the last attention of a
    CLS-token head)."""
    from .cams import METHODS
    from .model import choose_layer, find_layer, gradient_reach, target_layers

    cands = target_layers(model, geometry)
    target = (find_layer(model, layer, cands, input_shape=geometry) if layer
              else choose_layer(model, cands, input_shape=geometry))
    H, W = geometry[:2]
    if target.is_tokens and target.patch:
        ph, pw = target.patch
        if H % ph or W % pw:
            raise BiasscopeError(
                f"--image-size {H} {W} does not divide by the patch size {ph}x{pw} of layer "
                f"{target.patch_layer!r} ({H} = {H // ph} x {ph} + {H % ph}, {W} = {W // pw} x {pw} "
                f"+ {W % pw}): the image's last rows/columns would be cut off the patch grid; "
                f"use a multiple of {ph}x{pw}")
    if layer and target.is_tokens and METHODS[method].needs_gradients:
        if gradient_reach(model, [target], geometry)[0] == 0:
            h, w, _ = target.shape
            raise BiasscopeError(
                f"layer {target.path!r} ({target.describe()}): the class scores do not depend on "
                f"its {h * w} patch tokens (largest gradient 0), so --method {method} has nothing to "
                "weigh; the head reads only the extra token after this layer: choose a layer "
                "before the last attention, leave out --layer, or use --method eigencam or scorecam")
    return target


def _prepare_out(out: Path, fingerprint: str, parts: dict, *, resume: bool,
                 overwrite: bool) -> dict | None:
    """Decide what to do with an existing output directory; returns the meta to resume from."""
    meta = read_meta(out)
    if meta is None:
        foreign = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
        if [n for n in foreign if n not in _OWNED] and not overwrite:
            raise BiasscopeError(f"{out} exists and holds other files ({', '.join(sorted(foreign)[:3])}); "
                                 "choose another --out or pass --overwrite")
        _clear(out)
        return None
    if meta.get("fingerprint") != fingerprint:
        if not overwrite:
            old_parts = meta.get("fingerprint_parts", {})
            words = {"model": "a different model", "data": "different data", "options": "other options"}
            diff = [words[k] for k in words if old_parts.get(k) != parts.get(k)] or ["a different model or dataset"]
            raise BiasscopeError(f"{out} holds a scan of {' and '.join(diff)}; choose another --out "
                                 "or pass --overwrite")
        _clear(out)
        return None
    if not resume:
        _clear(out)
        return None
    return meta


def _clear(out: Path) -> None:
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _fingerprint(model_sha: str, ds: Dataset, options: dict) -> tuple[str, dict]:
    import hashlib
    import json

    parts = {"model": model_sha, "data": ds.fingerprint(),
             "options": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def _versions() -> dict:
    import keras
    import tensorflow as tf

    return {"biasscope": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "pandas": pd.__version__}


def scan(model, data, *, masks=None, out=None, layer: str | None = None, method: str = "gradcam",
         batch_size: int = 16, image_size=None, preprocess="none", class_map=None,
         limit: int | None = None, resume: bool = True, overwrite: bool = False,
         unsafe_model: bool = False, seed: int = 0, chunk_size: int | None = None,
         counterfactuals: bool | None = None, fail_on=(), analysis: bool = True,
         report: bool = True, detector_options: dict | None = None, progress=True,
         scorecam_channels: int = 32, engine: str = "local", ray_address: str | None = None,
         workers: int | None = None, gpus_per_worker: float | None = None) -> Scan:
    """Run Grad-CAM (or another CAM method) over a labelled image set and store the result in ``out``.

    Parameters
    ----------
    model : path or keras.Model
        ``.keras``, ``.h5`` or SavedModel directory, or a model object.
    data : path or pandas.DataFrame
        A directory in the layout of DESIGN section 3, a manifest CSV, or a manifest DataFrame
        (columns ``path``, ``label``, optional ``mask``/``x0,y0,x1,y1``, attributes).
    out : path, optional
        The scan directory (default: a new temporary directory). An interrupted scan there is
        resumed when ``resume`` is true; a scan of another model or dataset is refused unless
        ``overwrite``.
    layer : str, optional
        The target layer: a nested path or a unique name, spatial (B, H, W, C) or token
        (B, T, D); default: automatic (DESIGN section 9).
    method : str
        ``gradcam``, ``gradcampp``, ``xgradcam``, ``hirescam``, ``layercam``, ``eigencam`` or
        ``scorecam``.
    scorecam_channels : int
        Score-CAM's N: the channels with the highest mean activation that get a masked forward
        pass each (its cost is about N forward passes per image).
    preprocess : str or callable
        ``none``, ``scale01``, a ``keras.applications`` module name, or a callable on a float32
        batch in 0..255.
    counterfactuals : bool, optional
        Run the background-swap tests (default: when any image has a mask).
    fail_on : sequence of str
        Gate expressions (``spurious_background``, ``severity>=0.7``, ``worst_group_acc<0.8``);
        their results are in ``summary["gates"]``.
    report : bool
        Write ``report.html`` into ``out`` after the analysis (default).
    analysis : bool
        Run the analysis (clusters, projection, findings) after the Grad-CAM pass (default).
        A finished scan in ``out`` is not recomputed; its analysis is redone with the current
        options.
    engine : str
        Who runs the CAM pass and the counterfactual pass: ``local`` (this process, default) or
        ``ray`` (Ray Data actors, one model each; the ``[ray]`` extra). The stored result is the
        same; a scan begun on one engine resumes on the other.
    ray_address : str, optional
        ``HOST:PORT`` of a running Ray cluster (``ray``; default: the Ray this process is
        connected to, ``RAY_ADDRESS``, or a local Ray started for the pass and shut down after).
    workers : int, optional
        Ray actors (default: one per CPU of the cluster, or per ``gpus_per_worker`` GPUs).
    gpus_per_worker : float, optional
        GPUs each Ray actor reserves (default 0).

    Returns
    -------
    Scan
    """
    from .engines import PassJob, check_engine_options, open_engine
    from .model import model_fingerprint, output_head
    from .summary import validate_gates

    rep = as_reporter(progress)
    t0 = time.perf_counter()
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise BiasscopeError(f"--out {out} is a file")
    validate_gates(list(fail_on or ()))  # a typo in a gate fails now, not after the scan
    check_engine_options(engine, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
    if batch_size < 1:
        raise BiasscopeError(f"--batch-size must be >= 1, got {batch_size}")
    from .methods import METHOD_LABELS, check_method

    cam_options = check_method(method, scorecam_channels)
    kmodel, model_path = _load_model(model, unsafe_model)
    head = output_head(kmodel)
    H, W, C = _input_geometry(kmodel, image_size)
    target = resolve_target(kmodel, layer, method, (H, W, C))
    ds = load_dataset(data, masks=masks, class_map=class_map, n_outputs=head.n_classes, limit=limit)
    if chunk_size is None:
        chunk_size = batch_size * 64
    chunk_size = max(batch_size, (int(chunk_size) // batch_size) * batch_size)

    pre_name = preprocess if isinstance(preprocess, str) or preprocess is None else \
        getattr(preprocess, "__qualname__", "callable")
    options = {"layer": target.path, "method": method, **cam_options, "image_size": [H, W], "channels": C,
               "preprocess": pre_name, "class_index": ds.class_index, "batch_size": batch_size,
               "chunk_size": chunk_size, "limit": limit}  # what the Grad-CAM pass depends on
    model_sha = model_fingerprint(kmodel, model_path)
    fp, fp_parts = _fingerprint(model_sha, ds, options)

    out = Path(tempfile.mkdtemp(prefix="biasscope-")) if out is None else Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BiasscopeError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    with _scan_folder(out, n_total=len(ds), chunk_size=chunk_size, rep=rep):
        old = _prepare_out(out, fp, fp_parts, resume=resume, overwrite=overwrite)
        post = dict(model=kmodel, target=target, ds=ds, geometry=(H, W, C), batch_size=batch_size,
                    preprocess=preprocess,
                    seed=seed, counterfactuals=counterfactuals, fail_on=fail_on,
                    detector_options=detector_options, report=report, rep=rep,
                    engine=dict(engine=engine, ray_address=ray_address, workers=workers,
                                gpus_per_worker=gpus_per_worker, model_path=model_path,
                                model_sha=model_sha, unsafe_model=unsafe_model))
        if old is not None and old.get("status") == "complete":
            rep.note(f"[green]{out}[/] already holds this CAM pass; redoing only the analysis")
            return _analyse_scan(load(out), **post) if analysis else load(out)

        meta = {
            "schema_version": SCHEMA_VERSION, "status": "running", "fingerprint": fp,
            "fingerprint_parts": fp_parts,
            "model": {"path": str(model_path.resolve()) if model_path else None, "sha256": model_sha,
                      "name": kmodel.name, "head": head.kind, "n_outputs": head.n_outputs},
            "layer": target.path, "layer_shape": list(target.shape), "layer_output": target.describe(),
            "method": method,
            "classes": ds.classes, "class_index": ds.class_index,
            "data_root": str(ds.root), "masks": str(Path(masks).resolve()) if masks is not None else None,
            "n_images": len(ds), "attributes": ds.attributes,
            "options": {**options, "seed": seed}, "versions": _versions(),
        }
        from .cams import make_cam
        from .counterfactuals import _rows_with_masks
        from .pipeline import why_unreadable

        cam = make_cam(method, kmodel, target, head, batch_size=batch_size, input_shape=(H, W, C),
                       preprocess=preprocess, **cam_options)
        cam.trace()  # a method that cannot work on this layer fails before anything is written
        heat_shape = tuple(int(s) for s in target.shape[:2])
        files, mask_files = ds.table["file"].to_numpy(), ds.table["mask_file"].to_numpy()

        def reasons(indices):
            return [why_unreadable(files[i], mask_files[i]) for i in indices]

        names = np.array([ds.output_names.get(i, f"#{i}") for i in range(head.n_classes)], dtype=object)
        job = PassJob(ds=ds, geometry=(H, W, C), batch_size=batch_size, chunk_size=chunk_size,
                      method=method, cam_options=cam_options, preprocess=preprocess, layer=target.path,
                      model_path=model_path, model_sha=model_sha, unsafe_model=unsafe_model)
        # the engine is not part of the fingerprint: a scan begun on one resumes on the other
        with open_engine(engine, ray_address=ray_address, workers=workers,
                         gpus_per_worker=gpus_per_worker, progress=rep) as runner:
            meta["engine"] = runner.info
            write_json(out / "meta.json", meta)
            writer = ChunkWriter(out, n_total=len(ds), chunk_size=chunk_size, heat_shape=heat_shape)
            start = writer.start_index
            t_pass = time.perf_counter()
            if start:
                rep.note(f"resuming at image {start:,} of {len(ds):,} ({writer.next_chunk} chunk(s) already stored)")
            # the local pass keeps its decoded inputs (when exact and small enough) for the
            # counterfactual pass, which then reads no file again
            keep = None
            if (runner.name == "local" and ds.arrays is None and not start and analysis
                    and counterfactuals is not False and _rows_with_masks(ds).any()):
                from .decoded import DecodedInputs

                keep = DecodedInputs.create(len(ds), H, W, C)
            with rep.task(runner.label(METHOD_LABELS.get(method, method)), total=len(ds)) as task:
                task.advance(start)
                stats = (runner.run(job, cam, writer, task, reasons) if keep is None
                         else runner.run(job, cam, writer, task, reasons, keep=keep))
            post["inputs"] = keep
        pass_s = time.perf_counter() - t_pass
        table, skipped = writer.assemble(out, ds.table.drop(columns=["file", "mask_file"]))
        table.insert(table.columns.get_loc("pred_idx"), "pred", names[table["pred_idx"].to_numpy()])
        table["cluster"] = pd.array([pd.NA] * len(table), dtype="Int32")  # filled by the analysis
        table["embed_x"] = np.nan
        table["embed_y"] = np.nan
        table["flags"] = [[] for _ in range(len(table))]
        table = table.drop(columns=[c for c in BOX_COLS if table[c].isna().all()])
        write_table(out, table)
        writer.cleanup()

        skipped = [{"path": str(ds.table["path"].iloc[s["index"]]), "reason": s["reason"]} for s in skipped]
        for s in skipped[:5]:
            rep.note(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
        if len(skipped) > 5:
            rep.note(f"[yellow]skipped {len(skipped) - 5} more undecodable image(s)[/]; all are listed in meta.json")
        warnings = {
            "missing_masks": {"count": len(ds.missing_masks), "examples": ds.missing_masks[:10]},
            "mask_resized": stats.mask_resized,
            "mask_aspect_differs": {"count": stats.mask_aspect, "examples": stats.aspect_examples[:10]},
        }
        if ds.missing_masks:
            rep.note(f"[yellow]warning[/]: {len(ds.missing_masks)} mask file(s) not found "
                     f"(first: {ds.missing_masks[0]}); those rows have no mask metrics")
        if stats.mask_aspect:
            rep.note(f"[yellow]warning[/]: {stats.mask_aspect} mask(s) have a different aspect ratio "
                     f"from their image (first: {stats.aspect_examples[0]}); resized anyway")
        zero = _zero_heatmaps(table, target.path)
        if zero:
            warnings["heatmaps_all_zero"] = zero
            rep.note(f"[yellow]warning[/]: {escape(zero)}")
        meta.update({
            "status": "complete", "n_scanned": len(table), "skipped": skipped, "warnings": warnings,
            "timings": {"total_s": time.perf_counter() - t0, "gradcam_pass_s": pass_s,
                        "setup_s": t_pass - t0, "assemble_s": time.perf_counter() - t_pass - pass_s,
                        "images_per_s": (len(ds) - start) / pass_s if pass_s > 0 else None,
                        "resumed_at": start, "traces": max(cam.concrete_functions, stats.traces),
                        "input_wait_s": stats.input_wait_s, "gradcam_wait_s": stats.gradcam_wait_s,
                        "postprocess_s": stats.postprocess_s, **stats.extra},
            "engine": {**meta["engine"], "chunks_run": stats.chunks_run, **stats.engine},
        })
        write_json(out / "meta.json", meta)
        return _analyse_scan(load(out), **post) if analysis else load(out)


@contextlib.contextmanager
def _scan_folder(out: Path, *, n_total: int, chunk_size: int, rep):
    """Hold ``OUT/scan.lock`` while a scan writes into ``out``; turn Ctrl-C into
    :class:`ScanInterrupted` (how much is stored) and a full disk into a one-line error. What is
    stored stays: chunks are committed atomically, so the same call resumes."""
    lock = ScanLock(out, note=lambda msg: rep.note(f"[yellow]note[/]: {msg}"))
    lock.acquire()
    try:
        yield
    except KeyboardInterrupt:
        raise ScanInterrupted(stored_rows(out, chunk_size=chunk_size, n_total=n_total), n_total,
                              out) from None
    except OSError as exc:
        if _disk_full(exc):
            raise BiasscopeError(f"no space left on device writing {out}; the chunks stored so far "
                                 "are kept: free some space and run the same command again to "
                                 "resume") from None
        raise
    finally:
        lock.release()


def _disk_full(exc: OSError) -> bool:
    """A write that failed for want of space (pyarrow's OSError carries no errno)."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    msg = str(exc)
    return "No space left" in msg or ("requested and" in msg and "written" in msg)


def _zero_heatmaps(table: pd.DataFrame, layer: str) -> str | None:
    """The warning when every stored CAM is zero (nothing to measure or cluster), else None."""
    peaks = table["cam_max"].to_numpy(np.float64) if "cam_max" in table else np.zeros(0)
    if not len(peaks) or np.any(peaks > 0):
        return None
    return (f"the heatmaps are all zero at layer {layer}: the class scores have no positive "
            "gradient-weighted activation there. Likely causes: dead ReLUs (the layer outputs "
            "only zeros), a layer after which the class score does not depend on it, or a "
            "saturated softmax; try another --layer (biasscope layers MODEL)")


def _findings(ctx_args: dict, maps: dict) -> tuple:
    """:func:`biasscope.findings.detect` (the detectors, and the attractors): in the console
    script's helper process when there is one, which has scikit-learn and SciPy imported
    already (this process then never imports them: see ``biasscope._tf``), else here; the
    same code on the same inputs, so the same result. The stored maps go as the path of their
    ``.npy`` file."""
    from . import helper
    from .findings import detect

    side = helper.current()
    if side is not None:
        sent = {k: (None if h is None else helper.heatmaps_ref(h), p) for k, (h, p) in maps.items()}
        # the flags are the detectors' output: no detector reads them
        table = helper.pack_frame(ctx_args["table"], drop=("flags",))
        if side.submit("findings", ({**ctx_args, "table": table}, sent)):
            got = side.result()
            if got is not None:
                return got
    return detect(ctx_args, maps)


def _analyse_scan(result: Scan, *, model, target, ds, geometry, batch_size, preprocess, seed,
                  counterfactuals, fail_on, detector_options, report, rep, engine=None,
                  inputs=None) -> Scan:
    """Clusters, projection, counterfactual tests and findings; rewrites the scan's table and
    writes analysis.json, findings.json and summary.json. ``engine``: the scan's engine options
    (``engine``, ``ray_address``, ``workers``, ``gpus_per_worker``) and its model file
    (``model_path``, ``model_sha``, ``unsafe_model``): with ``engine="ray"`` the counterfactual
    pass runs on Ray too. ``inputs``: the CAM pass's decoded images
    (:class:`~biasscope.decoded.DecodedInputs`), read by a local counterfactual pass."""
    from . import helper
    from .analysis import UNREAD_COLUMNS, analyse, fill_columns
    from .summary import evaluate_gates, summarise

    out, table, timings = result.path, result.table, {}

    def clusters_and_map():
        t = time.perf_counter()
        kwargs = dict(seed=seed, classes=ds.classes, attributes=ds.attributes)
        got = None
        side = helper.current()
        if side is not None:
            # in the console script's helper process, which does not hold this one's GIL (the
            # same code and libraries: the same result; on any failure it is computed here)
            slim = table.drop(columns=[c for c in UNREAD_COLUMNS if c in table.columns])
            if side.submit("analyse", ((slim, helper.heatmaps_ref(result.heatmaps)), kwargs)):
                got = side.result()
        if got is None:
            got = analyse(table, result.heatmaps, **kwargs)
        return got, time.perf_counter() - t

    has_masks = bool(table["inside_frac"].notna().any())
    cf = None
    if counterfactuals or (counterfactuals is None and has_masks):
        from .counterfactuals import run_counterfactuals, sample_size_for

        # The clusters and the 2-D map (numpy and scikit-learn) run in a thread alongside the
        # counterfactual pass (TensorFlow), which leaves part of the cores idle; neither reads
        # the other's results.
        with ThreadPoolExecutor(1) as pool:
            analysis_job = pool.submit(clusters_and_map)
            t = time.perf_counter()
            H, W, C = geometry
            # the scan's own predictions: the originals are not run again, and the mistakes
            # among them get an Only-BG image whether sampled or not
            predictions = np.full(len(ds), -1, np.int64)
            predictions[table["index"].to_numpy(np.int64)] = table["pred_idx"].to_numpy(np.int64)
            with _counterfactual_runner(engine, model=model, target=target, rep=rep) as runner:
                cf = run_counterfactuals(model, ds, image_size=(H, W), channels=C, batch_size=batch_size,
                                         preprocess=preprocess, seed=seed, target=target,
                                         mixed_per_class=sample_size_for(0.03), predictions=predictions,
                                         runner=runner, inputs=inputs, progress=rep)
            timings["counterfactuals_s"] = time.perf_counter() - t
            if isinstance(cf.get("method"), dict):
                timings["counterfactuals_engine"] = cf["method"]["engine"]["name"]
            t = time.perf_counter()
            (columns, info), timings["analysis_s"] = analysis_job.result()
            timings["analysis_after_counterfactuals_s"] = time.perf_counter() - t
    else:
        with rep.task("analysis: clusters and 2-D map", total=None, unit="step"):
            (columns, info), timings["analysis_s"] = clusters_and_map()
    table = fill_columns(table, columns)
    if inputs is not None:
        inputs.drop()  # only the counterfactual pass reads them
    object_embedding = _object_embedding(cf, table)
    occlusion = _occlusion(model, ds, table, info, geometry=geometry, batch_size=batch_size,
                           preprocess=preprocess, seed=seed, options=detector_options, rep=rep,
                           timings=timings)
    t = time.perf_counter()
    zero = _zero_heatmaps(table, str(result.meta.get("layer")))
    options = dict(detector_options or {})
    if zero:
        # nothing to measure or cluster: the heatmap detectors say so instead of reporting
        # findings computed from empty maps
        options["zero_heatmaps"] = zero.split(":")[0] + "; nothing to measure"
        info["warnings"] = {"heatmaps_all_zero": zero}
    findings, status, flags, attractors = _findings(
        dict(table=table, analysis=info, classes=ds.classes, class_index=ds.class_index,
             attributes=ds.attributes, options=options, counterfactuals=cf,
             object_embedding=object_embedding, occlusion=occlusion),
        {"heatmaps": (result.heatmaps, np.asarray(table["cam_max"], np.float32)),
         "heatmaps_true": (result.heatmaps_true, np.asarray(table["cam_true_max"], np.float32))})
    table["flags"] = flags
    timings["findings_s"] = time.perf_counter() - t
    info["detectors"] = status
    info["counterfactuals"] = cf if cf is not None else {"skipped": "not run" if has_masks else "no masks"}
    info["occlusion"] = occlusion
    info["attractors"] = attractors if attractors is not None else {
        "skipped": "counterfactual tests not run"}
    info["timings"] = timings
    # a finding of severity 0.00 says nothing: never listed
    found = [f.to_dict() for f in findings if f.severity >= 0.005]
    summary = summarise(table, found, info)
    summary["gates"] = evaluate_gates(list(fail_on or ()), summary, found)
    summary["gate_tripped"] = any(g["tripped"] for g in summary["gates"])
    write_table(out, table)
    write_json(out / "analysis.json", info, indent=None)  # per-image lists: compact
    write_json(out / "findings.json", found)
    write_json(out / "summary.json", summary)
    result = load(out)
    if report:
        t = time.perf_counter()
        with rep.task("writing the report", total=None, unit="step"):
            result.write_report()
        result.meta.setdefault("timings", {})["report_s"] = time.perf_counter() - t
        write_json(out / "meta.json", result.meta)
    return result


@contextlib.contextmanager
def _counterfactual_runner(engine: dict | None, *, model, target, rep):
    """The ``runner`` of the counterfactual pass: None (this process) unless the scan's engine is
    ``ray``; then the Ray engine's, connected (or a local Ray started) for this pass alone."""
    opts = dict(engine or {})
    if opts.get("engine", "local") != "ray":
        yield None
        return
    from .engines import open_engine

    with open_engine("ray", ray_address=opts.get("ray_address"), workers=opts.get("workers"),
                     gpus_per_worker=opts.get("gpus_per_worker"), progress=rep) as eng:
        yield eng.counterfactuals(model=model, model_path=opts.get("model_path"),
                                  model_sha=opts.get("model_sha"),
                                  unsafe_model=bool(opts.get("unsafe_model")),
                                  target_path=None if target is None else target.path)


def _occlusion(model, ds, table, info, *, geometry, batch_size, preprocess, seed, options, rep,
               timings) -> dict:
    """Occlusion tests of the clusters at one spot (:mod:`biasscope.causal`)."""
    from .causal import plan, summarise
    from .findings import DEFAULT_OPTIONS

    opts = {**DEFAULT_OPTIONS, **dict(options or {})}
    H, W, C = geometry
    tests = plan(info, table, (H, W), opts, seed=seed)
    if not tests:
        return {"clusters": {}, "n_tested": 0, "reason": "no cluster attends at one spot"}
    from .occlusion import run_occlusion

    t = time.perf_counter()
    res = run_occlusion(model, ds, tests, image_size=(H, W), channels=C, batch_size=batch_size,
                        preprocess=preprocess, progress=rep)
    timings["occlusion_s"] = time.perf_counter() - t
    return {"clusters": summarise(tests, res, table, ds.class_index), "n_tested": len(tests),
            "fill": res["fill"], "n_pairs": res["n_pairs"],
            "method": ("the cluster's hot spot (cells holding half of its mean heatmap, grown by "
                       "one cell) replaced by the image's mean colour, on its members and on up "
                       "to 128 images predicted as other classes (controls)")}


def _object_embedding(cf, table: pd.DataFrame) -> np.ndarray | None:
    """The counterfactual pass's object embeddings, one row per table row (NaN for the images
    without one); removed from ``cf`` (arrays, not JSON)."""
    emb = cf.pop("object_embedding", None) if isinstance(cf, dict) else None
    if emb is None or len(emb["index"]) == 0:
        return None
    row = pd.Series(np.arange(len(table)), index=table["index"].to_numpy(np.int64))
    idx = np.asarray(emb["index"], np.int64)
    keep = np.isin(idx, row.index)
    out = np.full((len(table), emb["features"].shape[1]), np.nan, np.float32)
    out[row.loc[idx[keep]].to_numpy()] = emb["features"][keep]
    return out

