"""Attention-vs-mask metrics for Grad-CAM heatmaps, vectorised over a batch.

Notation used throughout: ``h >= 0`` is a CAM after ReLU, bilinearly upsampled to the mask's
resolution; ``M`` is the binary object mask, ``|M|`` its pixel count and ``P`` the number of
pixels of one map. Every metric returns a float64 array with one value per row of the batch and
NaN where it is undefined.

==================  =========================================================================
``inside_frac``     Relevance Mass Accuracy, ``sum(h * M) / sum(h)`` [1]_.
``mask_frac``       ``|M| / P``, the value ``inside_frac`` takes for uniform attention.
``lift``            ``inside_frac / mask_frac``; 1.0 means no better than uniform attention.
``pointing_hit``    Pointing Game [2]_: 1.0 if the maximum of ``h`` lies in ``M``.
``energy_inside``   Relevance Rank Accuracy, ``|TopK(h) & M| / K`` with ``K = |M|`` [1]_.
``cam_entropy``     Shannon entropy of ``h / sum(h)`` divided by ``log(P)``.
==================  =========================================================================

RMA, RRA and the pointing game agree with the implementations in Quantus
(``quantus.RelevanceMassAccuracy``, ``quantus.RelevanceRankAccuracy``,
``quantus.PointingGame`` with ``abs=False, normalise=False``; their default ``normalise=True``
divides by the maximum, which none of these three metrics is sensitive to for ``h >= 0``)
whenever ``h`` has no ties. Ties are frequent in CAMs -- ReLU leaves whole regions at exactly
zero -- so the two tie rules are fixed here, and both are independent of pixel order (a
left-right flip of ``h`` and ``M`` together never changes a score):

* ``pointing_hit`` counts a hit only if *every* pixel attaining the maximum lies in ``M``
  (Quantus counts a hit if *any* does).
* ``energy_inside`` counts pixels strictly above the ``K``-th largest value ``t`` fully and
  shares the remaining ``r`` places among the pixels equal to ``t`` in proportion, i.e. they
  contribute ``r * |{h == t} & M| / |{h == t}|``. This is the expected score when ties are
  broken uniformly at random. (Quantus takes whatever order ``np.argsort(-h)`` returns, which
  for tied values depends on the sort algorithm and on pixel position.) An all-zero ``h``
  therefore scores ``mask_frac``, the chance level.

References
----------
.. [1] Arras, L., Osman, A. and Samek, W. (2022). "CLEVR-XAI: A benchmark dataset for the
   ground truth evaluation of neural network explanations." *Information Fusion* 81, 14-40.
.. [2] Zhang, J., Bargal, S. A., Lin, Z., Brandt, J., Shen, X. and Sclaroff, S. (2018).
   "Top-down neural attention by excitation backprop." *International Journal of Computer
   Vision* 126, 1084-1102.
"""

from __future__ import annotations

import functools

import numpy as np

from biasscope.errors import BiasscopeError

__all__ = [
    "COLUMNS",
    "attention_metrics",
    "cam_entropy",
    "energy_inside",
    "inside_frac",
    "lift",
    "mask_frac",
    "pointing_hit",
    "upsample_bilinear",
]

#: Keys of the dict returned by :func:`attention_metrics`, in column order.
COLUMNS = ("inside_frac", "mask_frac", "lift", "pointing_hit", "energy_inside", "cam_entropy")

_MASK_COLUMNS = ("inside_frac", "mask_frac", "lift", "pointing_hit", "energy_inside")


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _shape(a) -> str:
    return str(tuple(np.shape(a)))


def _as_float(x, name: str, *, axes: str) -> np.ndarray:
    """Return ``x`` as a 3-d float32/float64 array ``(n, *, *)`` or raise BiasscopeError."""
    try:
        a = np.asarray(x)
    except Exception as exc:  # ragged nested lists and the like
        raise BiasscopeError(f"{name} must be an array of shape {axes}: {exc}") from None
    if a.dtype.kind not in "biuf":
        raise BiasscopeError(f"{name} must be numeric with shape {axes}, got dtype {a.dtype}")
    if a.ndim != 3:
        raise BiasscopeError(
            f"{name} must have shape {axes} (3 dimensions), got {name} of shape {_shape(a)}"
        )
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return a


def _check_heatmap(x, name: str = "h", *, axes: str = "(n, H, W)") -> np.ndarray:
    """Validate a non-negative, finite batch of heatmaps."""
    a = _as_float(x, name, axes=axes)
    if a.size:
        if not np.isfinite(a).all():
            raise BiasscopeError(f"{name} of shape {_shape(a)} contains NaN or infinite values")
        lo = a.min()
        if lo < 0:
            raise BiasscopeError(
                f"{name} must be non-negative (a CAM after ReLU); {name} of shape "
                f"{_shape(a)} has minimum {float(lo):.6g}"
            )
    return a


def _as_mask(masks) -> np.ndarray:
    """Return ``masks`` as a 3-d bool array or raise BiasscopeError."""
    try:
        m = np.asarray(masks)
    except Exception as exc:  # ragged nested lists and the like
        raise BiasscopeError(f"masks must be an array of shape (n, H, W): {exc}") from None
    if m.ndim != 3:
        raise BiasscopeError(
            f"masks must have shape (n, H, W) (3 dimensions), got masks of shape {_shape(m)}"
        )
    if m.dtype == bool:
        # a bool array built from raw bytes may hold 255 for True: normalise
        return m.view(np.uint8) != 0
    if m.dtype.kind not in "biuf":
        raise BiasscopeError(f"masks must be boolean or 0/1, got dtype {m.dtype}")
    if m.size and np.any((m != 0) & (m != 1)):
        raise BiasscopeError(
            f"masks must be binary (bool or 0/1); masks of shape {_shape(m)} has other values "
            "(a soft mask? threshold it first)"
        )
    return m != 0


def _check_masks(masks, h: np.ndarray) -> np.ndarray:
    """Validate masks against heatmaps ``h`` of shape (n, H, W); return them as bool."""
    shape = None
    try:
        shape = np.shape(masks)
    except Exception:
        pass
    if shape != h.shape:
        raise BiasscopeError(
            f"masks must have shape (n, H, W) matching h: h is {_shape(h)}, masks is "
            f"{shape if shape is not None else 'ragged'}"
        )
    return _as_mask(masks)


def _check_size(size) -> tuple[int, int]:
    try:
        H, W = (int(s) for s in size)
        ok = all(float(s) == int(s) for s in size)
    except Exception:
        raise BiasscopeError(f"size must be a pair (H, W) of positive ints, got {size!r}") from None
    if not ok or H < 1 or W < 1:
        raise BiasscopeError(f"size must be a pair (H, W) of positive ints, got {size!r}")
    return H, W


def _check_valid(mask_valid, n: int) -> np.ndarray | None:
    if mask_valid is None:
        return None
    v = np.asarray(mask_valid)
    if v.shape != (n,):
        raise BiasscopeError(
            f"mask_valid must have shape (n,) matching cams: cams has n={n}, "
            f"mask_valid is {_shape(v)}"
        )
    if v.dtype != bool:
        if v.dtype.kind not in "biuf" or np.any((v != 0) & (v != 1)):
            raise BiasscopeError(f"mask_valid must be boolean, got dtype {v.dtype}")
        v = v != 0
    return v


# ----------------------------------------------------------------------------------------------
# Upsampling
# ----------------------------------------------------------------------------------------------


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-d linear interpolation with half-pixel centres.

    Mirrors TensorFlow's ``ResizeBilinear(half_pixel_centers=True)``: the source coordinate of
    output pixel ``i`` is ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the edge pixels.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    mat = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


@functools.lru_cache(maxsize=64)
def _interp_f32(n_in: int, n_out: int) -> np.ndarray:
    """:func:`_interp_matrix` as float32, read-only and cached: the report resizes thousands of
    maps of the same two shapes one at a time."""
    mat = _interp_matrix(n_in, n_out).astype(np.float32)
    mat.setflags(write=False)
    return mat


def upsample_bilinear(cams, size) -> np.ndarray:
    """Resize a batch of maps bilinearly, as ``tf.image.resize(..., "bilinear")`` does.

    Half-pixel centres, no antialiasing, edge pixels clamped -- identical (to float32
    round-off) to ``tf.image.resize(cams[..., None], size, method="bilinear",
    antialias=False)[..., 0]``. Computed as ``R @ cams @ C.T`` with two small interpolation
    matrices, so a batch costs one pair of matrix products.

    Parameters
    ----------
    cams : array-like of shape (n, h, w)
        Maps to resize (any real values).
    size : pair of int (H, W)
        Output height and width.

    Returns
    -------
    ndarray of float32, shape (n, H, W)
        The resized maps; a float32 copy of ``cams`` when ``(h, w) == (H, W)``.

    Raises
    ------
    BiasscopeError
        If ``cams`` is not 3-d and numeric or ``size`` is not a pair of positive ints.
    """
    a = _as_float(cams, "cams", axes="(n, h, w)")
    H, W = _check_size(size)
    return _upsample(a, H, W)


def _upsample(a: np.ndarray, H: int, W: int) -> np.ndarray:
    h, w = a.shape[1:]
    if (h, w) == (H, W):
        return a.astype(np.float32, copy=True)
    if h == 0 or w == 0:
        raise BiasscopeError(f"cams must have non-empty maps to resize, cams is {_shape(a)}")
    rows = _interp_f32(h, H)  # (H, h)
    cols = _interp_f32(w, W)  # (W, w)
    # float32 throughout, as TensorFlow computes; each output mixes at most four inputs.
    return np.matmul(rows, np.matmul(a.astype(np.float32, copy=False), cols.T))


# ----------------------------------------------------------------------------------------------
# Shared computation
# ----------------------------------------------------------------------------------------------


def _nan_where(values: np.ndarray, undefined: np.ndarray) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    out[undefined] = np.nan
    return out


def _count_rows(b: np.ndarray) -> np.ndarray:
    """Per-row count of True in a 2-d bool array, as int64 (summing bytes: ~3x count_nonzero)."""
    acc = np.int32 if b.shape[1] < 2**31 else np.int64
    return b.view(np.uint8).sum(axis=1, dtype=acc).astype(np.int64)


def _scratch(buf: np.ndarray | None, like: np.ndarray, dtype) -> np.ndarray:
    """A work array shaped like ``like``: ``buf`` when given, else a fresh one.

    The batch functions below write their temporaries into one float and one bool work array
    that :func:`attention_metrics` shares between them: a fresh multi-megabyte temporary per
    operation costs about as much in page faults as the arithmetic it holds.
    """
    return np.empty(like.shape, dtype) if buf is None else buf


def _sums(hf: np.ndarray, mf: np.ndarray, *, fbuf=None) -> dict:
    """Per-row quantities shared by several metrics; hf (n, P) float, mf (n, P) bool."""
    total = hf.sum(axis=1, dtype=np.float64)
    k = _count_rows(mf)
    # Same values summed in the same order as `total` where h is all inside: exactly 1.0 then.
    inside = np.multiply(hf, mf, out=_scratch(fbuf, hf, hf.dtype)).sum(axis=1, dtype=np.float64)
    return {"total": total, "k": k, "inside": inside}


def _inside_frac(s: dict) -> np.ndarray:
    undefined = (s["total"] <= 0) | (s["k"] == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _nan_where(s["inside"] / s["total"], undefined)


def _mask_frac(s: dict, n_pixels: int) -> np.ndarray:
    return s["k"] / np.float64(n_pixels)


def _pointing_hit(hf: np.ndarray, mf: np.ndarray, k: np.ndarray, *, bbuf=None) -> np.ndarray:
    n, P = hf.shape
    if P == 0:
        return np.full(n, np.nan)
    peak = hf.max(axis=1, keepdims=True)
    # Tie rule: a hit only if no pixel attaining the maximum lies outside the mask.
    at_peak = np.equal(hf, peak, out=_scratch(bbuf, hf, bool))
    outside_peak = np.greater(at_peak, mf, out=at_peak)  # at_peak & ~mf for booleans
    miss = np.any(outside_peak, axis=1)
    return _nan_where(~miss, (k == 0) | (peak[:, 0] <= 0))


def _energy_inside(hf: np.ndarray, mf: np.ndarray, k: np.ndarray, *, fbuf=None, bbuf=None):
    n, P = hf.shape
    if n == 0 or P == 0:
        return np.full(n, np.nan)
    # t = K-th largest value of each row (one vectorised sort; K differs per row).
    srt = _scratch(fbuf, hf, hf.dtype)
    srt[...] = hf
    srt.sort(axis=1)
    idx = np.clip(P - k, 0, P - 1)
    t = np.take_along_axis(srt, idx[:, None], axis=1)
    top = np.greater_equal(hf, t, out=_scratch(bbuf, hf, bool))
    n_top = _count_rows(top)  # >= k; > k only if several pixels equal t
    score = _count_rows(np.logical_and(top, mf, out=top)).astype(np.float64)
    excess = np.flatnonzero(n_top > k)
    if excess.size:
        # Ties at the threshold: the pixels equal to t share the places left after the pixels
        # strictly above t, in proportion to how many of them lie in the mask.
        tied = hf[excess] == t[excess]
        n_tied = _count_rows(tied)
        remaining = k[excess] - (n_top[excess] - n_tied)  # 1 <= remaining <= n_tied
        n_tied_in = _count_rows(np.logical_and(tied, mf[excess], out=tied))
        n_above_in = score[excess] - n_tied_in
        score[excess] = n_above_in + remaining * (n_tied_in / n_tied)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = score / k
    return _nan_where(score, k == 0)


def _cam_entropy(hf: np.ndarray, total: np.ndarray, *, fbuf=None) -> np.ndarray:
    n, P = hf.shape
    if P <= 1:  # log(P) == 0: normalised entropy is undefined
        return np.full(n, np.nan)
    # H = -sum(p log p) with p = h / S  ==  log S - sum(h log h) / S; 0 log 0 = 0 via max(h, tiny).
    hlogh = np.maximum(hf, np.finfo(hf.dtype).tiny, out=_scratch(fbuf, hf, hf.dtype))
    np.log(hlogh, out=hlogh)
    hlogh *= hf
    undefined = total <= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = (np.log(total) - hlogh.sum(axis=1, dtype=np.float64) / total) / np.log(P)
    # Exact bounds are [0, 1]; clip only the floating-point round-off.
    return _nan_where(np.clip(ent, 0.0, 1.0), undefined)


def _flat(h: np.ndarray, m: np.ndarray | None = None):
    shape = (h.shape[0], h.shape[1] * h.shape[2])
    hf = h.reshape(shape)
    return hf if m is None else (hf, m.reshape(shape))


def _prepare(h, masks):
    a = _check_heatmap(h)
    return a, _check_masks(masks, a)


# ----------------------------------------------------------------------------------------------
# Public metrics
# ----------------------------------------------------------------------------------------------


def inside_frac(h, masks) -> np.ndarray:
    """Relevance Mass Accuracy: fraction of the heatmap's mass that falls inside the mask.

    ``mu = sum(h * M) / sum(h)`` (Arras et al. 2022; ``quantus.RelevanceMassAccuracy``).

    Parameters
    ----------
    h : array-like of shape (n, H, W)
        Non-negative heatmaps at the mask resolution.
    masks : array-like of bool or 0/1, shape (n, H, W)
        Object masks.

    Returns
    -------
    ndarray of float64, shape (n,)
        Values in [0, 1]; NaN where ``sum(h) == 0`` or the mask is empty.

    Raises
    ------
    BiasscopeError
        On wrong shapes, non-binary masks, or negative / non-finite ``h``.
    """
    a, m = _prepare(h, masks)
    hf, mf = _flat(a, m)
    return _inside_frac(_sums(hf, mf))


def mask_frac(masks) -> np.ndarray:
    """Fraction of the image covered by the mask, ``|M| / P``: the chance level of inside_frac.

    Parameters
    ----------
    masks : array-like of bool or 0/1, shape (n, H, W)
        Object masks.

    Returns
    -------
    ndarray of float64, shape (n,)
        Values in [0, 1] (0 for an empty mask).

    Raises
    ------
    BiasscopeError
        On a non-3-d or non-binary ``masks``.
    """
    m = _as_mask(masks)
    n, P = m.shape[0], m.shape[1] * m.shape[2]
    if P == 0:
        return np.full(n, np.nan)
    return _count_rows(m.reshape(n, P)) / np.float64(P)


def lift(h, masks) -> np.ndarray:
    """Relevance mass inside the mask relative to chance: ``inside_frac / mask_frac``.

    1.0 means the heatmap puts no more mass on the object than uniform attention would;
    the maximum is ``1 / mask_frac``.

    Parameters
    ----------
    h : array-like of shape (n, H, W)
        Non-negative heatmaps at the mask resolution.
    masks : array-like of bool or 0/1, shape (n, H, W)
        Object masks.

    Returns
    -------
    ndarray of float64, shape (n,)
        Values in [0, P / |M|]; NaN where ``inside_frac`` is NaN.

    Raises
    ------
    BiasscopeError
        On wrong shapes, non-binary masks, or negative / non-finite ``h``.
    """
    a, m = _prepare(h, masks)
    hf, mf = _flat(a, m)
    s = _sums(hf, mf)
    if hf.shape[1] == 0:
        return np.full(hf.shape[0], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _inside_frac(s) / _mask_frac(s, hf.shape[1])


def pointing_hit(h, masks) -> np.ndarray:
    """Pointing Game: 1.0 if the heatmap's maximum lies inside the mask, else 0.0.

    Zhang et al. (2018); ``quantus.PointingGame``. Tie rule: when several pixels attain the
    maximum, it is a hit only if **all** of them lie in the mask (Quantus: if any does).

    Parameters
    ----------
    h : array-like of shape (n, H, W)
        Non-negative heatmaps at the mask resolution.
    masks : array-like of bool or 0/1, shape (n, H, W)
        Object masks.

    Returns
    -------
    ndarray of float64, shape (n,)
        0.0 or 1.0; NaN where the mask is empty or ``h`` is all zero.

    Raises
    ------
    BiasscopeError
        On wrong shapes, non-binary masks, or negative / non-finite ``h``.
    """
    a, m = _prepare(h, masks)
    hf, mf = _flat(a, m)
    return _pointing_hit(hf, mf, _count_rows(mf))


def energy_inside(h, masks) -> np.ndarray:
    """Relevance Rank Accuracy: share of the ``K = |M|`` highest pixels that lie in the mask.

    ``|TopK(h) & M| / K`` (Arras et al. 2022; ``quantus.RelevanceRankAccuracy``). Tie rule:
    pixels tied with the ``K``-th largest value share the remaining top-``K`` places in
    proportion (the expected score under uniformly random tie-breaking), so the result does not
    depend on pixel order; an all-zero ``h`` scores ``mask_frac``.

    Parameters
    ----------
    h : array-like of shape (n, H, W)
        Non-negative heatmaps at the mask resolution.
    masks : array-like of bool or 0/1, shape (n, H, W)
        Object masks.

    Returns
    -------
    ndarray of float64, shape (n,)
        Values in [0, 1]; NaN where the mask is empty.

    Raises
    ------
    BiasscopeError
        On wrong shapes, non-binary masks, or negative / non-finite ``h``.
    """
    a, m = _prepare(h, masks)
    hf, mf = _flat(a, m)
    return _energy_inside(hf, mf, _count_rows(mf))


def cam_entropy(h) -> np.ndarray:
    """Normalised Shannon entropy of the heatmap seen as a distribution over pixels.

    ``-sum(p log p) / log(P)`` with ``p = h / sum(h)``, natural log and ``0 log 0 = 0``:
    0 for attention on a single pixel, 1 for uniform attention.

    Parameters
    ----------
    h : array-like of shape (n, H, W)
        Non-negative heatmaps (any resolution).

    Returns
    -------
    ndarray of float64, shape (n,)
        Values in [0, 1]; NaN where ``sum(h) == 0`` (and for single-pixel maps, ``P == 1``).

    Raises
    ------
    BiasscopeError
        On a non-3-d, negative or non-finite ``h``.
    """
    a = _check_heatmap(h)
    hf = _flat(a)
    return _cam_entropy(hf, hf.sum(axis=1, dtype=np.float64))


def attention_metrics(cams, masks=None, *, mask_valid=None) -> dict[str, np.ndarray]:
    """All six attention metrics for one batch, sharing the upsampling and the sums.

    Parameters
    ----------
    cams : array-like of shape (n, h, w)
        Non-negative CAMs at the layer's resolution.
    masks : array-like of bool or 0/1, shape (n, H, W), optional
        Object masks. The CAMs are upsampled once to ``(H, W)`` with
        :func:`upsample_bilinear` and every metric, ``cam_entropy`` included, is computed on
        the upsampled maps.
    mask_valid : array-like of bool, shape (n,), optional
        Which rows have a real mask; rows marked False get NaN in every mask-based metric
        (their mask content is ignored). Default: all rows valid.

    Returns
    -------
    dict of str to ndarray of float64, shape (n,)
        Keys :data:`COLUMNS`: ``inside_frac``, ``mask_frac``, ``lift``, ``pointing_hit``,
        ``energy_inside``, ``cam_entropy``. When ``masks`` is None, ``cam_entropy`` is
        computed on ``cams`` at their own resolution and every other entry is NaN.

    Raises
    ------
    BiasscopeError
        On wrong shapes, non-binary masks, or negative / non-finite ``cams``.
    """
    a = _check_heatmap(cams, "cams", axes="(n, h, w)")
    n = a.shape[0]
    valid = _check_valid(mask_valid, n)
    if masks is None:
        hf = _flat(a)
        out = {name: np.full(n, np.nan) for name in _MASK_COLUMNS}
        out["cam_entropy"] = _cam_entropy(hf, hf.sum(axis=1, dtype=np.float64))
        return {name: out[name] for name in COLUMNS}

    try:
        shape = np.shape(masks)
    except Exception:
        shape = "ragged"
    if len(shape) != 3 or shape[0] != n:
        raise BiasscopeError(
            f"masks must have shape (n, H, W) with the same n as cams: cams is {_shape(a)}, "
            f"masks is {shape}"
        )
    m = _as_mask(masks)
    H, W = m.shape[1:]
    if H < 1 or W < 1:
        raise BiasscopeError(f"masks must have non-empty maps: masks is {_shape(m)}")
    h = _upsample(a, H, W)
    hf, mf = _flat(h, m)
    fbuf, bbuf = np.empty_like(hf), np.empty(hf.shape, bool)
    s = _sums(hf, mf, fbuf=fbuf)
    out = {
        "inside_frac": _inside_frac(s),
        "mask_frac": _mask_frac(s, hf.shape[1]),
        "pointing_hit": _pointing_hit(hf, mf, s["k"], bbuf=bbuf),
        "energy_inside": _energy_inside(hf, mf, s["k"], fbuf=fbuf, bbuf=bbuf),
        "cam_entropy": _cam_entropy(hf, s["total"], fbuf=fbuf),
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        out["lift"] = out["inside_frac"] / out["mask_frac"]
    if valid is not None:
        for name in _MASK_COLUMNS:
            out[name][~valid] = np.nan
    return {name: out[name] for name in COLUMNS}
