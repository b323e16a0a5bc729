"""The local engine: the CAM pass in this process, and the batch loop every engine runs.

:func:`run_batches` is the loop over one input pipeline: while the model works on a batch (in a
worker thread), the previous batch's rows are computed (:func:`biasscope.kernel.batch_rows`) and
handed to a sink. The local engine's sink is the scan's :class:`~biasscope.store.ChunkWriter`;
a Ray actor's sink collects one chunk's rows to return them to the driver.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import PassJob, PassStats
from ..kernel import batch_rows


def run_batches(cam, pipe, ds, sink, stats: PassStats | None = None, keep=None) -> PassStats:
    """Run ``cam`` over every batch of ``pipe`` and call ``sink(cols, cam_p, cam_t)`` once per
    batch, in order; returns the loop's timings and the mask geometry counts. ``keep``: a
    :class:`~biasscope.decoded.DecodedInputs` that receives every batch's decoded rows."""
    stats = PassStats() if stats is None else stats
    label_idx_all = ds.table["label_idx"].to_numpy()
    mask_files = ds.table["mask_file"].to_numpy()
    paths = ds.table["path"].to_numpy()

    def postprocess(batch, res):
        """Metrics, rows and storage for one batch; runs while the next batch is on the model."""
        t = time.perf_counter()
        idx = batch["index"].numpy()
        valid = idx >= 0
        check_mask_geometry(batch, valid, idx[valid], mask_files, paths, stats)
        masks, has_mask = batch["mask"].numpy(), batch["has_mask"].numpy()
        if keep is not None:
            keep.put(idx[valid], batch["image"].numpy()[valid], masks[valid], has_mask[valid],
                     batch["image_hw"].numpy()[valid])
        cols, cam_p, cam_t = batch_rows(res, idx, masks, has_mask, label_idx_all[idx[valid]])
        sink(cols, cam_p, cam_t)
        stats.postprocess_s += time.perf_counter() - t

    with ThreadPoolExecutor(1) as pool:
        prev = None
        it = iter(pipe)
        while True:
            t = time.perf_counter()
            batch = next(it, None)
            stats.input_wait_s += time.perf_counter() - t
            if batch is None:
                break
            running = pool.submit(cam, batch["image"], batch["label"])
            if prev is not None:
                postprocess(*prev)
            t = time.perf_counter()
            prev = (batch, running.result())
            stats.gradcam_wait_s += time.perf_counter() - t
        if prev is not None:
            postprocess(*prev)
    stats.traces = max(stats.traces, int(cam.concrete_functions))
    return stats


def check_mask_geometry(batch, valid: np.ndarray, idx: np.ndarray, mask_files: np.ndarray,
                        paths: np.ndarray, stats: PassStats) -> None:
    """Masks are resized to the image geometry; count them and note (up to 10) the images whose
    mask has another aspect ratio. ``valid``: the batch's real (unpadded) rows, ``idx`` their
    dataset indices."""
    has_file = mask_files[idx] != ""
    if not has_file.any():
        return
    ihw = batch["image_hw"].numpy()[valid][has_file].astype(np.float64)
    mhw = batch["mask_hw"].numpy()[valid][has_file].astype(np.float64)
    resized = np.any(ihw != mhw, axis=1)
    stats.mask_resized += int(resized.sum())
    aspect = np.abs(ihw[:, 0] / ihw[:, 1] - mhw[:, 0] / mhw[:, 1]) > 0.01 * ihw[:, 0] / ihw[:, 1]
    if aspect.any():
        stats.mask_aspect += int(aspect.sum())
        found = paths[idx][has_file][aspect]
        stats.aspect_examples.extend(found[: max(0, 10 - len(stats.aspect_examples))].tolist())


class LocalEngine:
    """The CAM pass in this process (``--engine local``)."""

    name = "local"

    @property
    def info(self) -> dict:
        return {"name": "local", "workers": 1, "address": None, "gpus_per_worker": None}

    def label(self, method_label: str) -> str:
        return method_label

    def run(self, job: PassJob, cam, writer, task, reasons, keep=None) -> PassStats:
        """Every row from ``writer.start_index`` on, into ``writer``; ``task`` advances per batch.
        ``keep`` (:class:`~biasscope.decoded.DecodedInputs`) receives the decoded rows and is
        marked complete when the pass began at the first row."""
        from ..pipeline import make_pipeline

        H, W, C = job.geometry
        start, first_chunk = writer.start_index, writer.next_chunk
        done = start

        def sink(cols, cam_p, cam_t):
            nonlocal done
            writer.add(cols, cam_p, cam_t, reasons=reasons)
            end = int(cols["index"][-1]) + 1 if len(cols["index"]) else done
            task.advance(end - done)
            done = end

        pipe = make_pipeline(job.ds, image_size=(H, W), channels=C, batch_size=job.batch_size, start=start)
        stats = run_batches(cam, pipe, job.ds, sink, keep=keep)
        writer.close(reasons)
        if keep is not None:
            keep.complete = start == 0
        task.advance(len(job.ds) - done)
        stats.chunks_run = writer.n_chunks - first_chunk
        return stats
