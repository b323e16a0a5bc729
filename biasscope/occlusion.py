"""Occlusion tests: does the prediction change when the region a heatmap points at is hidden?

A heatmap says where the model *looked*; it does not say that what it saw there *made* the
decision. The causal test is to take the region away and watch the output (Zeiler & Fergus,
2014, slid a grey square over the image for exactly this). Lapuschkin et al. (2019, "Unmasking
Clever Hans predictors") confirmed the Clever-Hans strategies their heatmaps revealed the same
way, by manipulating the highlighted area (the source tag of the "horse" images: removed, the
horse was no longer recognised; pasted onto a car, the car became a horse). When a class's
mean heatmap is hot on a watermark or a frame and hiding that area alone changes the
prediction, the model uses the artefact, whatever else it may also have learned. Unlike the
background tests of :mod:`biasscope.counterfactuals`, this needs no object masks: the region
comes from the heatmaps themselves.

A *test* is a region (a bool (H, W) map at the model's input size) and the rows of the dataset
it applies to, typically the images of one class and the hot area of that class's mean heatmap
(:func:`region_from_heatmap`). Every (test, row) pair is one occluded image; the pairs of all
tests are flattened and go through one compiled function (a ``tf.function`` with a fixed
batch shape, the last batch padded, so it traces once), which occludes the images
(:func:`occlude`) and runs the model's compiled forward pass
(:func:`biasscope.cams.compiled_forward`) on the originals and the occluded versions together.

The fill decides what "hidden" means, and any fill is itself a change the model may react to
(a flat patch is not a natural image region):

* ``mean``: the region becomes the mean colour of the rest of the image (the "grey square" of
  Zeiler & Fergus, in the image's own colour, so the patch does not add contrast the image
  did not have);
* ``blur``: the region becomes a strong blur of its surroundings (Gaussian, sigma = H/8, by
  normalised convolution ``blur(img * keep) / blur(keep)`` over the pixels outside the region):
  the region's detail is gone and its colour and brightness follow the neighbourhood, so the
  occluded image stays closer to the data.

A region that changes many predictions under both fills is strong evidence; a *control* test
with an equally large region elsewhere (the caller builds it: it is just another test) tells the
effect of hiding *this* region from the effect of hiding *anything*.

Per test: ``orig_pred`` and ``occluded_pred`` (output indices: the argmax, or the sign of a
single sigmoid/logit unit, as in :mod:`biasscope.counterfactuals`), ``changed_rate`` (share of
the pairs whose prediction changed) and ``moved_to`` (where the changed ones went).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ._tf import import_tf  # noqa: E402

tf = import_tf()

from .counterfactuals import _blur, _classifier, _gaussian_1d  # noqa: E402
from .data import BOX_COLS, Dataset  # noqa: E402
from .errors import BiasscopeError  # noqa: E402
from .progress import as_reporter  # noqa: E402

__all__ = ["FILLS", "occlude", "region_from_heatmap", "run_occlusion"]

#: ``mean``: the mean colour of the image outside the region; ``blur``: a strong blur of the
#: surroundings (normalised convolution over the pixels outside the region).
FILLS = ("mean", "blur")

# Canvas value where the region covers the whole image: mid-grey in the raw 0..255 input range.
_FULL_FILL = 127.5
# Blur sigma as a share of the image height: strong enough that no detail survives.
_BLUR_SIGMA_FRAC = 1.0 / 8.0
# Where less than this weight of the blur window was outside the region, the blur is not
# trusted and the mean colour is used.
_BLUR_MIN_WEIGHT = 1e-3
# Relative slack on the mass rule, so that float rounding of the cumulative sum does not add a
# cell (0.1 + 0.1 + 0.1 < 0.3 in floating point).
_MASS_RTOL = 1e-9


# ----------------------------------------------------------------------------------------------
# Regions (numpy)
# ----------------------------------------------------------------------------------------------


def _dilate_cells(cells: np.ndarray, grow: int) -> np.ndarray:
    """Binary dilation of a (h, w) bool map by a (2*grow+1)-square (separable: rows, then
    columns)."""
    if grow <= 0:
        return cells
    h, w = cells.shape
    out = cells.copy()
    pad = np.pad(cells, ((grow, grow), (0, 0)))
    for d in range(2 * grow + 1):
        out |= pad[d:d + h]
    pad = np.pad(out, ((0, 0), (grow, grow)))
    res = out.copy()
    for d in range(2 * grow + 1):
        res |= pad[:, d:d + w]
    return res


def region_from_heatmap(mean_heatmap, image_size, *, mass: float = 0.5,
                        grow: int = 1) -> np.ndarray:
    """The hot area of a heatmap as a pixel region at the model's input size.

    Parameters
    ----------
    mean_heatmap : array (h, w)
        Non-negative, any scale (e.g. a class's mean Grad-CAM at the target layer's
        resolution). Negative and non-finite values count as 0.
    image_size : (H, W)
    mass : float in (0, 1]
        The region is the smallest set of cells holding at least this share of the heatmap's
        total mass: cells are taken in descending order of value (a stable sort, so among
        equal values the first in row-major order comes first) until their sum reaches it.
    grow : int
        Cells by which the set grows afterwards (dilation by a (2*grow+1)-square of cells), so
        that the region covers what sits on the border of the hot cells too.

    Returns
    -------
    bool array (H, W): pixel (y, x) is in the region when cell (floor(y*h/H), floor(x*w/W)) is.
    An all-zero heatmap gives an all-False region.
    """
    hm = np.asarray(mean_heatmap, dtype=np.float64)
    if hm.ndim != 2 or hm.size == 0:
        raise BiasscopeError(f"mean_heatmap must be a non-empty 2-D array, got shape {hm.shape}")
    if not 0.0 < float(mass) <= 1.0:
        raise BiasscopeError(f"mass must be in (0, 1], got {mass}")
    if int(grow) < 0:
        raise BiasscopeError(f"grow must be >= 0, got {grow}")
    H, W = (int(s) for s in image_size)
    if H < 1 or W < 1:
        raise BiasscopeError(f"image_size must be positive, got {tuple(image_size)}")
    h, w = hm.shape
    hm = np.where(np.isfinite(hm) & (hm > 0), hm, 0.0)
    total = hm.sum()
    if total <= 0:
        return np.zeros((H, W), bool)
    flat = hm.ravel()
    order = np.argsort(-flat, kind="stable")
    cum = np.cumsum(flat[order])
    k = int(np.searchsorted(cum, float(mass) * total * (1.0 - _MASS_RTOL), side="left")) + 1
    cells = np.zeros(flat.size, bool)
    cells[order[:min(k, flat.size)]] = True
    cells = _dilate_cells(cells.reshape(h, w), int(grow))
    iy = (np.arange(H) * h) // H
    ix = (np.arange(W) * w) // W
    return cells[iy[:, None], ix[None, :]]


# ----------------------------------------------------------------------------------------------
# Occluding (batched TF ops)
# ----------------------------------------------------------------------------------------------


def _mean_colour(images, keep):
    """Per image and channel, the mean of the pixels where ``keep`` (B, H, W, 1) is 1; mid-grey
    where nothing is kept. Shape (B, 1, 1, C)."""
    n = tf.reduce_sum(keep, axis=(1, 2), keepdims=True)
    s = tf.reduce_sum(images * keep, axis=(1, 2), keepdims=True)
    return tf.where(n > 0, s / tf.maximum(n, 1.0), tf.constant(_FULL_FILL, tf.float32))


def occlude(images, regions, *, fill: str = "mean"):
    """Hide ``regions`` of ``images`` (batched; usable inside a ``tf.function``).

    Parameters
    ----------
    images : float32 (B, H, W, C)
        In the model's raw input range (before preprocessing).
    regions : bool (B, H, W)
        True on the pixels to hide.
    fill : {"mean", "blur"}
        ``mean``: the region's pixels become the mean colour of the image's pixels outside the
        region (mid-grey, 127.5, where the region covers everything). ``blur``: they become a
        Gaussian blur of the image with sigma = H/8, computed by normalised convolution over
        the pixels outside the region (``blur(img * keep) / blur(keep)``, so the region's own
        pixels do not leak in), falling back to the mean colour where ``blur(keep) < 1e-3``.

    Returns
    -------
    float32 (B, H, W, C): the images, with the region's pixels replaced.
    """
    if fill not in FILLS:
        raise BiasscopeError(f"fill must be one of {FILLS}, got {fill!r}")
    images = tf.convert_to_tensor(images, tf.float32)
    regions = tf.cast(tf.convert_to_tensor(regions), tf.bool)
    hole = regions[..., None]
    keep = 1.0 - tf.cast(hole, tf.float32)
    mean = _mean_colour(images, keep)
    if fill == "mean":
        value = tf.broadcast_to(mean, tf.shape(images))
    else:
        H = int(images.shape[1])
        k1d = tf.constant(_gaussian_1d(max(H * _BLUR_SIGMA_FRAC, 0.5)))
        num = _blur(images * keep, k1d)
        den = _blur(keep, k1d)
        # a weighted mean of kept pixels: inside their range, no clipping needed
        value = tf.where(den >= _BLUR_MIN_WEIGHT, num / tf.maximum(den, _BLUR_MIN_WEIGHT), mean)
    return tf.where(hole, value, images)


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


def _test_rows(rows, n_rows: int, test_id: str) -> np.ndarray:
    r = np.asarray(rows)
    if r.dtype == bool:
        if r.shape != (n_rows,):
            raise BiasscopeError(f"test {test_id!r}: a boolean 'rows' must have one entry per "
                                 f"dataset row ({n_rows}), got shape {r.shape}")
        return np.flatnonzero(r).astype(np.int64)
    r = r.ravel()
    if r.size and r.dtype.kind not in "iu" and not (
            r.dtype.kind == "f" and np.all(np.isfinite(r)) and np.all(r == np.round(r))):
        raise BiasscopeError(f"test {test_id!r}: 'rows' must be integer positions in ds.table")
    r = r.astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= n_rows):
        raise BiasscopeError(f"test {test_id!r}: row positions must be in 0..{n_rows - 1}, got "
                             f"{int(r.min())}..{int(r.max())}")
    return r


def _parse_tests(tests, n_rows: int, H: int, W: int):
    ids, rows, regions = [], [], []
    for i, t in enumerate(tests):
        try:
            tid, r, reg = str(t["id"]), t["rows"], t["region"]
        except (KeyError, TypeError):
            raise BiasscopeError(f"test {i}: expected a dict with 'id', 'rows' and "
                                 "'region'") from None
        if tid in ids:
            raise BiasscopeError(f"test id {tid!r} appears twice")
        reg = np.asarray(reg)
        if reg.shape != (H, W):
            raise BiasscopeError(f"test {tid!r}: region must have the model's input size {(H, W)}, "
                                 f"got shape {reg.shape}")
        ids.append(tid)
        rows.append(_test_rows(r, n_rows, tid))
        regions.append(reg.astype(bool))
    return ids, rows, regions


def _pair_dataset(ds: Dataset, pair_rows: np.ndarray) -> Dataset:
    """One row per pair (rows may repeat). Masks are dropped: occlusion does not use them, and
    a broken mask file must not cost the row its image."""
    table = ds.table.iloc[pair_rows].reset_index(drop=True)
    if ds.arrays is None:
        table = table.assign(mask_file="", **dict.fromkeys(BOX_COLS, np.nan))
        arrays = None
    else:
        arrays = {"images": np.asarray(ds.arrays["images"])[pair_rows], "masks": None}
    return dataclasses.replace(ds, table=table, arrays=arrays)


def _test_result(rows, orig, occ, n_requested: int, region) -> dict:
    changed = orig != occ
    n = int(rows.size)
    moved, counts = np.unique(occ[changed], return_counts=True)
    return {
        "rows": rows.astype(np.int64),
        "orig_pred": orig.astype(np.int64),
        "occluded_pred": occ.astype(np.int64),
        "n": n,
        "n_unreadable": int(n_requested - n),
        "changed_rate": float(changed.mean()) if n else None,
        "moved_to": {str(int(k)): int(c) for k, c in zip(moved, counts)},
        "region_share": float(np.mean(region)),
    }


def run_occlusion(model, ds: Dataset, tests, *, image_size, channels: int, batch_size: int,
                  preprocess="none", fill: str = "mean", progress=True) -> dict:
    """Occlusion tests over rows of ``ds``, all through one compiled function.

    Parameters
    ----------
    model : keras.Model
        Outputs class probabilities or logits (only the predicted index is used).
    ds : Dataset
    tests : list of dict
        ``{"id": str, "rows": int array of positions in ds.table (or a bool array with one
        entry per row), "region": bool (H, W)}``. Every (test, row) pair is one image: the
        row's image with the test's region occluded. Rows may repeat, within and across tests.
    image_size : (H, W)
    channels : int
    batch_size : int
        Fixed batch shape of the compiled function (pairs per batch; the originals run in the
        same forward pass, so the model sees twice as many images per call).
    preprocess : str or callable
        As for the scan (:func:`biasscope.cams.resolve_preprocess`); applied after occlusion,
        which works in the raw 0..255 range.
    fill : {"mean", "blur"}
        See :func:`occlude`.

    Returns
    -------
    dict
        ``tests``: {id: {``rows`` (int64, the test's readable rows in its order),
        ``orig_pred``, ``occluded_pred`` (int64, output indices), ``n``, ``n_unreadable``
        (rows whose image could not be decoded, dropped), ``changed_rate`` (share of the ``n``
        pairs whose prediction changed; None when ``n`` is 0), ``moved_to`` ({output index as
        str: count} of ``occluded_pred`` among the changed pairs), ``region_share`` (share of
        the image the region covers)}}; ``fill``; ``n_pairs`` (pairs requested, all tests);
        ``traces`` (times the compiled function was traced: 1, or 0 when nothing ran);
        ``batch_size``, ``image_size``, ``class_names``, ``elapsed_s``. The arrays are numpy
        (pass the result through :func:`biasscope.analysis.to_jsonable` before writing JSON).
    """
    if fill not in FILLS:
        raise BiasscopeError(f"fill must be one of {FILLS}, got {fill!r}")
    if int(batch_size) < 1:
        raise BiasscopeError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    B = int(batch_size)
    H, W = (int(s) for s in image_size)
    C = int(channels)
    ids, rows, regions = _parse_tests(list(tests), len(ds), H, W)
    n_pairs = int(sum(r.size for r in rows))

    def result(per_test: dict, traces: int) -> dict:
        return {"tests": per_test, "fill": fill, "n_pairs": n_pairs, "traces": int(traces),
                "batch_size": B, "image_size": [H, W],
                "class_names": {str(k): v for k, v in ds.output_names.items()},
                "elapsed_s": round(time.perf_counter() - t0, 3)}

    if n_pairs == 0:
        empty = np.zeros(0, np.int64)
        return result({tid: _test_result(empty, empty, empty, 0, reg)
                       for tid, reg in zip(ids, regions)}, 0)

    from .cams import compiled_forward
    from .pipeline import make_pipeline

    pair_test = np.concatenate([np.full(r.size, i, np.int64) for i, r in enumerate(rows)])
    pair_rows = np.concatenate(rows)
    test_regions = np.stack(regions)  # (T, H, W)

    # originals and occluded images in one forward pass of 2B
    forward = compiled_forward(model, batch_size=2 * B, input_shape=(H, W, C),
                               preprocess=preprocess)
    classify, _ = _classifier(model)

    @tf.function(input_signature=[tf.TensorSpec((B, H, W, C), tf.float32),
                                  tf.TensorSpec((B, H, W), tf.bool)], autograph=False)
    def step(images, regions):
        occluded = occlude(images, regions, fill=fill)
        pred = classify(forward(tf.concat([images, occluded], axis=0)))
        return pred[:B], pred[B:]

    pipe = make_pipeline(_pair_dataset(ds, pair_rows), image_size=(H, W), channels=C,
                         batch_size=B, start=0)
    pos_parts, orig_parts, occ_parts = [], [], []
    with as_reporter(progress).task("occlusion", total=n_pairs) as task:
        for batch in pipe:
            pos = batch["index"].numpy()
            valid = pos >= 0
            reg = test_regions[pair_test[np.maximum(pos, 0)]] & valid[:, None, None]
            p_orig, p_occ = step(batch["image"], tf.constant(reg))
            pos_parts.append(pos[valid])
            orig_parts.append(p_orig.numpy()[valid])
            occ_parts.append(p_occ.numpy()[valid])
            task.advance(int(valid.sum()))
    pos = np.concatenate(pos_parts) if pos_parts else np.zeros(0, np.int64)
    orig = np.concatenate(orig_parts) if orig_parts else np.zeros(0, np.int64)
    occ = np.concatenate(occ_parts) if occ_parts else np.zeros(0, np.int64)
    srt = np.argsort(pos, kind="stable")  # pair order (the pipeline keeps it; made sure)
    pos, orig, occ = pos[srt], orig[srt], occ[srt]
    which = pair_test[pos]
    per_test = {}
    for i, tid in enumerate(ids):
        sel = which == i
        per_test[tid] = _test_result(pair_rows[pos[sel]], orig[sel], occ[sel], rows[i].size,
                                     regions[i])
    return result(per_test, step.experimental_get_tracing_count())
