"""Counterfactual background tests in the style of the Backgrounds Challenge (Xiao et al., 2021).

For every image with an object mask, these versions go through the model's compiled forward
pass (:func:`biasscope.cams.compiled_forward`), batch by batch:

* **Original**: the image as it is.
* **Only-BG** (:func:`fill_background`): the object removed. The mask is dilated by ``dilate``
  pixels (no object edge survives) and the hole filled from the surroundings: a smooth colour
  field by *normalised convolution*, ``blur(img * keep) / blur(keep)``, over an image pyramid
  (push-pull: blended from the coarsest level, the mean background, down to about 4 px), plus
  the background's texture detail copied in from a shifted position of the same image that is
  background (a smooth fill alone leaves a flat "ghost" with the object's outline, which a
  model that knows the shapes reads as the object; Xiao et al. tile background texture into
  the hole for the same reason).
* **Only-FG** (:func:`only_foreground`): the object alone (its mask pixels) on a flat mid-grey
  canvas (127.5 in the 0..255 input range, before any preprocessing). Its prediction gives
  ``only_fg_acc``; with a ``target`` layer, the spatial mean of that layer's activations on it is
  the image's *object embedding*, which :mod:`biasscope.findings.label_issue` compares between
  images (the model's view of the object with the background taken out).
* **Mixed-Rand** (:func:`paste_objects`), ``draws`` times per object: the object (exactly its
  mask pixels) pasted onto the Only-BG image of another image of the same pool (``batch_size``
  consecutive rows). Rows are shuffled (seeded) before batching, so that a pool mixes classes;
  each draw's background is taken at random (with replacement) from the pool's images of
  *another class whose own
  Only-BG image the model does not read as the object's class* (tier 2), else of another class
  (tier 1), else any other image (tier 0). Sources and tiers are recorded.

The rows, in the order they are run, are cut into chunks of whole batches
(:data:`CHUNK_BATCHES`; :func:`plan_counterfactuals`), each run on its own by
:func:`run_chunk` with its own pairing RNG and the results put together by
:func:`aggregate_counterfactuals`: the local engine runs the chunks one after another, the Ray
engine (:class:`biasscope.engines.ray.RayCounterfactuals`) on its actors, with the same result.
Small images go through the compiled steps several pools of ``batch_size`` rows at a time
(:func:`pools_per_call`; the pairing stays within each pool). The local engine reads the CAM
pass's decoded images (:mod:`biasscope.decoded`) instead of the files where it kept them.

At scale (``mixed_per_class``, ``predictions``; what the scan passes): Mixed-Rand, transplant
and the Only-BG rates run on a stratified per-class sample sized for the CIs, Only-BG images are
made for the sample and the scan's mistakes, Only-FG for every image, and the originals are the
scan's own predictions (see :func:`run_counterfactuals`).

Why "not read as the object's class": Xiao et al.'s test sets have class-typical backgrounds, so
another class's background is, in practice, one that says "another class". A validation set
balanced over (class, background) groups -- the right design for worst-group accuracy, and the
built-in benchmark's -- breaks that: other classes' images carry *every* background, the object
class's own included, and the originals already sit on random backgrounds, so
``orig_acc - mixed_rand_acc`` is zero in expectation whatever the model does (measured on the
benchmark with ``pairing="class"``: -0.02..0.02 for every class). Excluding the backgrounds the
model itself attributes to the object's class restores the test's meaning on such data and
changes little where backgrounds are class-typical (another class's background is then rarely
read as the object's class). ``pairing="class"`` gives the plain pairing.

Per class ``c`` (images labelled ``c`` with a mask; CIs are seeded percentile-bootstrap 95%
intervals resampling images, an image's draws together):

``only_bg_rate``, ``only_bg_ci``
    share of ``c``'s Only-BG images predicted as ``c``; ``chance`` = 1 / number of classes;
    ``only_bg_base`` the share of the other classes' Only-BG images predicted as ``c`` (a model
    with a default answer for empty scenes has a high rate for that class everywhere) and
    ``only_bg_excess`` (``_ci``) the difference.
``only_fg_acc``, ``only_fg_ci``
    share of ``c``'s Only-FG images predicted as ``c`` (Xiao et al.'s Only-FG accuracy).
``orig_acc``, ``mixed_rand_acc``, ``bg_gap``, ``bg_gap_ci``
    accuracy on the originals and on their Mixed-Rand versions (tier-2 draws: ``c``'s object on
    other backgrounds; per image, the share of its draws correct), over the same images;
    ``bg_gap`` is the difference, its CI paired.
``transplant_rate``, ``transplant_ci``
    among Mixed-Rand images whose background came from an image of class ``c`` and whose object
    is of another class, the share predicted as ``c``; ``transplant_base`` the same share on
    backgrounds from a third class, ``transplant_excess`` (``_ci``) the difference.
``flip_rate``, ``flip_ci``
    among ``c``'s correctly classified images, the share of Mixed-Rand draws not classified as
    ``c``: how much of the class's accuracy depends on its background.

Plus the counts (``n``, ``n_mixed``, ``n_transplant``, ``n_correct``, ...). The whole result is
deterministic in ``seed``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._tf import import_tf  # noqa: E402

tf = import_tf()

from .analysis import to_jsonable  # noqa: E402
from .data import BOX_COLS, Dataset  # noqa: E402
from .errors import BiasscopeError  # noqa: E402
from .progress import as_reporter  # noqa: E402
from .stats import boot_ratio, interval  # noqa: E402

__all__ = ["PAIRINGS", "fill_background", "only_foreground", "paste_objects", "run_counterfactuals"]

#: ``background``: another class's image whose Only-BG prediction is not the object's class
#: (falls back to ``class``); ``class``: another class's image (Xiao et al.'s Mixed-Rand).
PAIRINGS = ("background", "class")

# A pyramid level's fill is trusted in full where at least this share of its blur window was
# known background; below that it is blended with the coarser levels' fill.
_FILL_TRUST = 0.25
_FILL_SIGMA = 1.0  # Gaussian sigma of each level's blur, in that level's pixels
# Texture detail = image minus its smooth field from pyramid level 2 on (about 4 px).
_DETAIL_LEVEL = 2
# Smallest batch: the backgrounds of one batch are the pool its objects are pasted onto.
_MIN_POOL = 8
# Only-FG canvas: mid-grey in the raw 0..255 input range (preprocessing is applied after).
_FG_FILL = 127.5


# ----------------------------------------------------------------------------------------------
# Building the counterfactual images (batched TF ops)
# ----------------------------------------------------------------------------------------------


def _gaussian_1d(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(x, k1d):
    """Separable Gaussian blur of (B, h, w, C) with zero padding (normalised convolution divides
    the zeros out again)."""
    c = x.shape[-1]
    kx = tf.tile(tf.reshape(k1d, (1, -1, 1, 1)), (1, 1, c, 1))
    ky = tf.tile(tf.reshape(k1d, (-1, 1, 1, 1)), (1, 1, c, 1))
    x = tf.nn.depthwise_conv2d(x, kx, (1, 1, 1, 1), "SAME")
    return tf.nn.depthwise_conv2d(x, ky, (1, 1, 1, 1), "SAME")


def _dilate(mask, pixels: int):
    """Binary dilation of a (B, H, W) bool mask by a (2p+1)-square: a max-pool along the rows,
    then along the columns, with the batch as the channels (the pooling kernels vectorise over
    channels: about half the time of the same pools on (B, H, W, 1))."""
    if pixels <= 0:
        return mask
    m = tf.transpose(tf.cast(mask, tf.float32), (1, 2, 0))[None]  # (1, H, W, B)
    m = tf.nn.max_pool2d(m, ksize=(1, 2 * pixels + 1), strides=1, padding="SAME")
    m = tf.nn.max_pool2d(m, ksize=(2 * pixels + 1, 1), strides=1, padding="SAME")
    return tf.transpose(m[0], (2, 0, 1)) > 0.5


def _push_pull(num0, den0, H: int, W: int, coarse_to: int):
    """Normalised convolution over an area-downsampled pyramid, blended from the coarsest level
    down to level ``coarse_to``: ``blur(img * keep) / blur(keep)`` on every level, holes
    included.

    Push: each level is the previous one area-downsampled by 2. Pull: from the coarsest level
    (about the mean background) down, each level's estimate is blended with the bilinear
    upsampling of the coarser blend, at that level's own resolution. Returns the blend at level
    ``coarse_to`` upsampled to (H, W): a colour field smooth at ~``2**coarse_to`` px that
    takes, at every hole pixel, the colour of the background nearest to it. The finer levels
    are not blurred at all (at ``coarse_to=2`` the pull costs about a sixteenth of one
    full-resolution blur).
    """
    k1d = tf.constant(_gaussian_1d(_FILL_SIGMA))
    n_levels = max(1, int(math.ceil(math.log2(max(H, W)))) + 1)
    stop = min(int(coarse_to), n_levels - 1)
    sizes = [(max(1, -(-H // 2 ** lv)), max(1, -(-W // 2 ** lv))) for lv in range(n_levels)]
    # numerator and weight as one tensor: one resize and one blur per level
    c = int(num0.shape[-1])
    levels = [tf.concat([num0, den0], axis=-1)]
    for size in sizes[1:]:
        prev = levels[-1]
        if prev.shape[1] == 2 * size[0] and prev.shape[2] == 2 * size[1]:
            levels.append(tf.nn.avg_pool2d(prev, 2, 2, "VALID"))  # = area resize, faster
        else:
            levels.append(tf.image.resize(prev, size, method="area"))
    out = None
    for level in reversed(range(stop, n_levels)):
        nd = _blur(levels[level], k1d)
        num, den = nd[..., :c], nd[..., c:]
        est = num / tf.maximum(den, 1e-6)
        trust = tf.clip_by_value(den / _FILL_TRUST, 0.0, 1.0)
        coarser = (tf.fill(tf.shape(est), 127.5) if out is None  # only where all is object
                   else tf.image.resize(out, sizes[level], method="bilinear"))
        out = trust * est + (1.0 - trust) * coarser
    return out if stop == 0 else tf.image.resize(out, (H, W), method="bilinear")


def _shifts(H: int, W: int) -> list:
    """Offsets (dy, dx) the texture is copied from, nearest first: quarter and half turns of the
    image in both axes (wrapping round)."""
    ys, xs = (0, H // 4, -(H // 4), H // 2), (0, W // 4, -(W // 4), W // 2)
    cand = {(dy, dx) for dy in ys for dx in xs}
    cand.discard((0, 0))
    return sorted(cand, key=lambda d: (d[0] ** 2 + d[1] ** 2, d))


def _shift_sources(H: int, W: int) -> np.ndarray:
    """For each pixel (rows, flat) and each shift of :func:`_shifts` (columns) the flat index of
    the pixel it copies from, as ``tf.roll(x, (dy, dx))`` would (wrapping round). Shape
    (H*W, S), int32."""
    y, x = np.mgrid[:H, :W]
    return np.stack([(((y - dy) % H) * W + (x - dx) % W).ravel() for dy, dx in _shifts(H, W)],
                    axis=1).astype(np.int32)


#: Shifts tried first for every hole pixel; only the pixels none of them serves are tried on
#: all of them. On the benchmark's validation masks the first three serve all but 58 of the
#: 633,634 hole pixels (the first two 93%): the fill costs 2.5 instead of 3.0 ms per 16 images
#: of 64 px, the same images.
_FIRST_SHIFTS = 3


def _texture_sources(hole_flat, at, H: int, W: int):
    """For the hole pixels ``at`` (flat positions ``b * H*W + p`` into ``hole_flat``, the
    batch's flattened hole mask): the flat position of the first shift's source pixel
    (:func:`_shift_sources`) that is background, and whether there is one (where not, the first
    shift's source). The first :data:`_FIRST_SHIFTS` shifts are tried on every hole pixel,
    all of them on the rest only: the same result as trying all on all."""
    HW = H * W
    table = _shift_sources(H, W)
    k = min(_FIRST_SHIFTS, table.shape[1])

    def first_background(p, base, shifts):
        src = tf.gather(tf.constant(shifts), p) + base[:, None]  # (n, shifts)
        bg_src = tf.logical_not(tf.gather(hole_flat, src))
        first = tf.argmax(tf.cast(bg_src, tf.int32), axis=1, output_type=tf.int32)
        return tf.gather(src, first, batch_dims=1), tf.reduce_any(bg_src, axis=1)

    base = (at // HW) * HW
    p = at - base
    pix, found = first_background(p, base, table[:, :k])
    if k == table.shape[1]:
        return pix, found
    rest = tf.cast(tf.where(tf.logical_not(found))[:, 0], tf.int32)
    pix_rest, found_rest = first_background(tf.gather(p, rest), tf.gather(base, rest), table)
    return (tf.tensor_scatter_nd_update(pix, rest[:, None], pix_rest),
            tf.tensor_scatter_nd_update(found, rest[:, None], found_rest))


def fill_background(images, masks, *, dilate: int = 2):
    """Only-BG images: the (dilated) object region of each image filled from its surroundings.

    The fill is a smooth colour field plus texture. The colour field is push-pull normalised
    convolution of the background (``blur(img * keep) / blur(keep)`` over a pyramid, from the
    background's mean colour at the coarsest level down to level 2, about 4 px), so every hole
    pixel takes the colour of the background nearest to it. A smooth fill alone would leave a
    flat "ghost" with the object's outline on a textured background
    (a model that knows the shapes reads the ghost as the object), so texture is added: the
    background's detail (image minus its own ~4-px smooth field) is copied in from a shifted
    position of the same image that is background (the first of a fixed list of shifts that
    lands on background, as in the Backgrounds Challenge's tiled Only-BG-T). Where no shift
    lands on background, the smooth fill stays.

    Parameters
    ----------
    images : float32 tensor of shape (B, H, W, C)
    masks : bool tensor of shape (B, H, W), True on the object
    dilate : int
        Pixels by which the mask grows before filling (no object edge remains).

    Returns
    -------
    float32 tensor of shape (B, H, W, C): outside the dilated mask the image itself, inside it
    the fill (an image whose mask covers everything is filled with mid-grey).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    hole = _dilate(tf.convert_to_tensor(masks, tf.bool), int(dilate))
    H, W, C = int(images.shape[1]), int(images.shape[2]), int(images.shape[-1])
    keep = 1.0 - tf.cast(hole, tf.float32)[..., None]
    smooth = _push_pull(images * keep, keep, H, W, coarse_to=_DETAIL_LEVEL)
    # Texture, computed on the hole pixels only (flat positions b * H*W + p): per hole pixel
    # the first shift whose source pixel is background, and there the background's detail
    # (image minus smooth field); one gather per step.
    hole_flat = tf.reshape(hole, (-1,))
    at = tf.cast(tf.where(hole_flat)[:, 0], tf.int32)
    pix, found = _texture_sources(hole_flat, at, H, W)
    flat_img, flat_smooth = tf.reshape(images, (-1, C)), tf.reshape(smooth, (-1, C))
    detail = tf.gather(flat_img, pix) - tf.gather(flat_smooth, pix)
    fill = tf.gather(flat_smooth, at) + tf.where(found[:, None], detail, 0.0)
    fill = tf.clip_by_value(fill, 0.0, 255.0)
    return tf.reshape(tf.tensor_scatter_nd_update(flat_img, at[:, None], fill), tf.shape(images))


def only_foreground(images, masks, fill: float = _FG_FILL):
    """The objects (mask pixels) of ``images`` (B, H, W, C) on a flat ``fill`` canvas."""
    return tf.where(tf.cast(masks, tf.bool)[..., None], images, tf.cast(fill, images.dtype))


def paste_objects(images, masks, backgrounds, source):
    """Mixed-Rand images: each image's mask pixels over ``backgrounds[source[i]]`` (batched)."""
    bg = tf.gather(backgrounds, source)
    return tf.where(masks[..., None], images, bg)


# ----------------------------------------------------------------------------------------------
# Pairing (numpy, per batch, vectorised)
# ----------------------------------------------------------------------------------------------


def _pair(labels, bg_pred, valid, rng, pairing: str):
    """A background source per valid row (-1 where none) and its tier.

    Tier 2: another class, and (``pairing="background"``) a background the model does not read
    as the object's class; tier 1: another class; tier 0: any other row. Within the best tier
    available to a row, the source is uniform at random (with replacement).
    """
    B = len(labels)
    other = valid[None, :] & valid[:, None] & ~np.eye(B, dtype=bool)
    diff = other & (labels[None, :] != labels[:, None])
    if pairing == "background":
        best = diff & (bg_pred[None, :] != labels[:, None])
    else:
        best = diff
    tier = np.where(best, 3.0, np.where(diff, 2.0, np.where(other, 1.0, -np.inf)))
    score = tier + rng.random((B, B))
    src = np.argmax(score, axis=1)
    got = np.max(tier, axis=1)
    ok = valid & np.isfinite(got)
    src = np.where(ok, src, -1)
    return src.astype(np.int32), np.where(ok, got - 1.0, -1).astype(np.int8)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


_boot, _interval = boot_ratio, interval


def _ci(num, den, n_boot: int, rng) -> list | None:
    """Percentile-bootstrap 95% CI of ``sum(num) / sum(den)`` (see :func:`_boot`)."""
    return _interval(_boot(num, den, n_boot, rng))


def _ci_diff(a, b, n_boot: int, rng) -> list | None:
    """95% CI of ratio(a) - ratio(b) for two independent groups ``a = (num, den)``, ``b``."""
    sa, sb = _boot(*a, n_boot, rng), _boot(*b, n_boot, rng)
    return None if sa is None or sb is None else _interval(sa - sb)


def _class_stats(ci: int, label, orig, only_bg, only_fg, mixed, src_label, tier, in_sample, *,
                 seed, n_boot, chance):
    """The figures of one class (output index ``ci``).

    ``label``, ``orig``, ``only_bg``, ``only_fg`` have shape (n,) over the processed images;
    ``mixed``, ``src_label`` (the label of each draw's background image) and ``tier`` have shape
    (n, draws).
    """
    def rng(k):
        return np.random.default_rng([int(seed), int(ci), k])

    def ratio(num, den):
        d = float(np.sum(den))
        return float(np.sum(num)) / d if d > 0 else None

    def diff(x, y):
        return None if x is None or y is None else x - y

    mine = label == ci
    good = tier == 2  # draws with a background of the intended kind
    hit = mixed == ci
    ones = np.ones(int(mine.sum()))
    # Only-BG: one per image; the base rate is how often other classes' backgrounds are read as c
    # (on the stratified sample: every image of it has an Only-BG image; outside it only the
    # mistakes have one, which would bias the rates)
    ob = (only_bg[mine & in_sample] == ci).astype(float)
    ob_other = (only_bg[~mine & in_sample] == ci).astype(float)
    fg = (only_fg[mine] == ci).astype(float)
    # BG-gap: per image, original correct minus the share of its Mixed-Rand draws correct
    k = good[mine].sum(axis=1)
    paired = k > 0
    o = (orig[mine][paired] == ci).astype(float)
    m = (hit[mine] & good[mine]).sum(axis=1)[paired] / k[paired]
    # transplant: other classes' objects on backgrounds from c's images (base: on backgrounds
    # from a third class's images)
    other_obj = (tier >= 1)[~mine]
    from_c = other_obj & (src_label[~mine] == ci)
    from_else = other_obj & (src_label[~mine] != ci)
    tr = ((from_c & hit[~mine]).sum(axis=1), from_c.sum(axis=1))
    tr_base = ((from_else & hit[~mine]).sum(axis=1), from_else.sum(axis=1))
    # flips: c's correctly classified images whose Mixed-Rand version is not c
    ok = (orig[mine] == ci) & paired
    fl = ((good[mine][ok] & ~hit[mine][ok]).sum(axis=1), good[mine][ok].sum(axis=1))
    ob_ones = np.ones_like(ob)
    only_bg_rate, only_bg_base = ratio(ob, ob_ones), ratio(ob_other, np.ones_like(ob_other))
    transplant_rate, transplant_base = ratio(*tr), ratio(*tr_base)
    return {
        "n": int(mine.sum()),
        "chance": chance,
        "only_bg_rate": only_bg_rate,
        "n_only_bg": int(ob.size),
        "only_bg_ci": _ci(ob, ob_ones, n_boot, rng(0)),
        "only_bg_base": only_bg_base,
        "only_bg_excess": diff(only_bg_rate, only_bg_base),
        "only_bg_excess_ci": _ci_diff((ob, ob_ones), (ob_other, np.ones_like(ob_other)), n_boot,
                                      rng(4)),
        "only_fg_acc": ratio(fg, ones),
        "only_fg_ci": _ci(fg, ones, n_boot, rng(6)),
        "n_mixed": int(paired.sum()),
        "n_mixed_draws": int(k.sum()),
        "n_draws_same_class": int(((tier == 0) & mine[:, None]).sum()),
        "n_draws_bg_read_as_class": int(((tier == 1) & mine[:, None]).sum()),
        "orig_acc": ratio(o, np.ones_like(o)),
        "mixed_rand_acc": ratio(m, np.ones_like(m)),
        "bg_gap": ratio(o - m, np.ones_like(o)),
        "bg_gap_ci": _ci(o - m, np.ones_like(o), n_boot, rng(1)),
        "n_transplant": int(tr[1].sum()),
        "transplant_rate": transplant_rate,
        "transplant_ci": _ci(*tr, n_boot, rng(2)),
        "transplant_base": transplant_base,
        "transplant_excess": diff(transplant_rate, transplant_base),
        "transplant_excess_ci": _ci_diff(tr, tr_base, n_boot, rng(5)),
        "n_correct": int(ok.sum()),
        "flip_rate": ratio(*fl),
        "flip_ci": _ci(*fl, n_boot, rng(3)),
    }


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


#: Mixed-Rand objects per class: enough for a 95% CI half-width of about 0.03 on a rate
#: (1.96^2 * 0.25 / 0.03^2 = 1,068, the worst case p = 0.5).
def sample_size_for(half_width: float = 0.03, z: float = 1.96) -> int:
    """Images per class for a 95% CI of half-width ``half_width`` on a rate (worst case 0.5)."""
    if not 0 < half_width < 0.5:
        raise BiasscopeError(f"half_width must be in (0, 0.5), got {half_width}")
    return int(np.ceil(z * z * 0.25 / (half_width * half_width)))


def stratified_sample(table, rows: np.ndarray, per_class: int | None, attributes, seed: int) -> np.ndarray:
    """Which of ``rows`` (dataset rows with a mask) get Mixed-Rand draws: every row of a class
    with at most ``per_class`` of them; else ``per_class`` rows drawn at random (seeded), spread
    over the class's attribute groups in proportion to their sizes (each group at least one).
    Returns a bool array over ``rows``."""
    keep = np.ones(len(rows), bool)
    if per_class is None or len(rows) == 0:
        return keep
    sub = table.iloc[rows]
    labels = sub["label_idx"].to_numpy()
    attrs = [a for a in (attributes or []) if a in sub.columns]
    # one group id per attribute combination (a groupby, not a string join per row)
    groups = (sub.groupby(attrs, sort=True, dropna=False).ngroup().to_numpy() if attrs
              else np.zeros(len(rows), np.int64))
    for c in np.unique(labels):
        mine = np.flatnonzero(labels == c)
        if len(mine) <= per_class:
            continue
        keep[mine] = False
        rng = np.random.default_rng([int(seed), 2, int(c)])
        gs, counts = np.unique(groups[mine], return_counts=True)
        quota = np.maximum(1, np.floor(per_class * counts / len(mine)).astype(int))
        for g, q in zip(gs, quota):
            members = mine[groups[mine] == g]
            keep[rng.choice(members, min(q, len(members)), replace=False)] = True
    return keep


def _rows_with_masks(ds: Dataset) -> np.ndarray:
    if ds.arrays is not None:
        if ds.arrays.get("masks") is None:
            return np.zeros(len(ds), bool)
        return np.asarray(ds.arrays["masks"]).reshape(len(ds), -1).any(axis=1)
    t = ds.table
    box = np.isfinite(t[list(BOX_COLS)].to_numpy(dtype=np.float64)).all(axis=1)
    return (t["mask_file"].astype(str) != "").to_numpy() | box


def _classifier(model):
    """(classify, head): class index from the model's output (argmax, or the sign of a single
    sigmoid/logit unit) and the model's :class:`~biasscope.model.OutputHead`."""
    from .model import output_head

    head = output_head(model)
    if head.n_outputs == 1:
        cut = 0.5 if head.kind == "sigmoid" else 0.0

        def classify(out):
            return tf.cast(tf.cast(out, tf.float32)[:, 0] > cut, tf.int32)
    else:
        def classify(out):
            return tf.argmax(tf.cast(out, tf.float32), axis=-1, output_type=tf.int32)
    return classify, head


def run_counterfactuals(model, ds: Dataset, *, image_size, channels: int, batch_size: int,
                        preprocess="none", seed: int = 0, n_boot: int = 1000, draws: int = 4,
                        pairing: str = "background", dilate: int = 2, target=None,
                        mixed_per_class: int | None = None, predictions=None,
                        chunk_batches: int | None = None, runner=None, inputs=None,
                        progress=True) -> dict:
    """Only-BG / Mixed-Rand background tests over the images of ``ds`` that have a mask.

    Parameters
    ----------
    model : keras.Model
        Outputs class probabilities or logits (only the argmax is used).
    ds : Dataset
        Rows with a mask file, a box or in-memory masks are tested; the others are counted.
    image_size : (H, W)
    channels : int
    batch_size : int
        The pool each Mixed-Rand background is drawn from, so at least 8 is used (a pool must
        hold several classes). The compiled functions take :func:`pools_per_call` consecutive
        pools at a time (several for small images).
    preprocess : str or callable
        As for the scan (:func:`biasscope.cams.resolve_preprocess`).
    seed : int
        Row shuffle, background pairing and bootstrap.
    n_boot : int
        Bootstrap resamples per CI.
    draws : int
        Most Mixed-Rand backgrounds per object. Each costs one forward pass per batch;
        averaging over several backgrounds per object takes the noise of the background draw
        out of the BG-gap (on the 800-image benchmark, 1 draw gives a CI half-width of about
        0.08, 4 draws about 0.06). With ``mixed_per_class``, a class gets
        ``round(mixed_per_class / sampled objects)`` draws per object, 1..``draws``: about
        ``mixed_per_class`` draws per class, so a class sampled in full (a large one) gets 1.
    pairing : {"background", "class"}
        See the module docstring.
    dilate : int
        Pixels by which the mask grows before the object is removed.
    target : LayerInfo, optional
        A spatial layer (:func:`biasscope.model.choose_layer`): the spatial mean of its
        activations on each Only-FG image is returned as the object embedding.
    mixed_per_class : int, optional
        Mixed-Rand (and so transplant) draws on a stratified sample of this many objects per
        class (:func:`stratified_sample`; every object of a smaller class); ``None``: every
        object. The Only-BG rates are taken on the same sample. The scan passes
        :func:`sample_size_for` (1,068: a CI half-width of about 0.03).
    predictions : int array (len(ds),), optional
        The model's prediction (output index) for every image, as the scan stored it (-1
        where unknown). Given, the originals are not run again, and Only-BG images are made
        for the sample and for the mistakes only (the root-cause explanations and
        ``label_issue`` read the Only-BG prediction of every mistake); Only-FG covers every
        image (``label_issue`` compares every object's embedding). Without, the originals are
        predicted here and every image gets an Only-BG image.
    chunk_batches : int, optional
        Batches per chunk (default :data:`CHUNK_BATCHES`): the rows, in the order they are run,
        are cut into chunks of this many batches, each run on its own (its last batch padded,
        its own pairing RNG), so the result depends on the chunking but not on who runs the
        chunks or in what order.
    runner : callable, optional
        Who runs the chunks: ``runner(plan, specs, task) -> {chunk index: chunk result}``
        (:func:`run_chunk`'s results; ``task`` advances by rows), e.g. the Ray engine's
        :class:`biasscope.engines.ray.RayCounterfactuals`; its ``info`` (a dict) is recorded
        as ``method["engine"]``. Default: the chunks one after another in this process.
    inputs : DecodedInputs, optional
        The CAM pass's decoded images and masks (:mod:`biasscope.decoded`); with the default
        runner, when usable, the batches are built from them instead of the files (the same
        batches).

    Returns
    -------
    dict (JSON-serialisable)
        ``classes`` {name: figures}, ``n_images``, ``n_with_mask``, ``n_skipped``, ``seed``,
        ``n_boot``, ``method``, ``per_image`` (``index``, ``path``, ``label_idx``,
        ``orig_pred``, ``only_bg_pred`` (-1 where no Only-BG image was made), ``only_fg_pred``,
        ``in_sample`` (the stratified sample); ``mixed_pred``, ``bg_source_index``
        and ``pair_tier`` of the first draw; ``mixed_pred_all``, ``bg_source_index_all``, ``pair_tier_all`` of
        every draw, shape (n, draws)), ``elapsed_s``; or ``{"skipped": "no masks"}`` when no
        image has a mask. With a ``target``, also ``object_embedding``: ``{"index": (n,),
        "features": (n, channels) float32, "layer": path}`` with numpy arrays (not JSON: pop it
        before writing the result).
    """
    t0 = time.perf_counter()
    plan = plan_counterfactuals(ds, image_size=image_size, channels=channels, batch_size=batch_size,
                                preprocess=preprocess, seed=seed, draws=draws, pairing=pairing,
                                dilate=dilate, mixed_per_class=mixed_per_class,
                                predictions=predictions, chunk_batches=chunk_batches)
    if plan is None:
        return {"skipped": "no masks"}
    specs = plan.chunks()
    with as_reporter(progress).task("counterfactuals", total=int(plan.rows.size)) as task:
        if runner is None:
            got = run_chunks(CounterfactualSteps(model, plan, target=target), plan, specs, task.advance,
                             inputs=inputs)
        else:
            got = runner(plan, specs, task)
    missing = [s["chunk"] for s in specs if s["chunk"] not in got]
    if missing:
        raise BiasscopeError(f"counterfactuals: no result for chunk(s) {missing[:5]}")
    engine = dict(getattr(runner, "info", None) or {"name": "local"})
    return aggregate_counterfactuals(plan, ds, [got[s["chunk"]] for s in specs],
                                     n_classes=_classifier(model)[1].n_classes, n_boot=n_boot,
                                     target_path=None if target is None else target.path,
                                     engine=engine, t0=t0)


# ----------------------------------------------------------------------------------------------
# Plan, chunks, aggregation (what the engines share)
# ----------------------------------------------------------------------------------------------

#: Batches per counterfactual chunk: the unit of work of an engine (a Ray work item) and of the
#: pairing RNG (``default_rng([seed, 1, chunk])``); a batch never straddles two chunks.
CHUNK_BATCHES = 64

_PART_KEYS = ("pos", "label", "orig", "only_bg", "only_fg", "emb", "mixed", "src", "tier")


@dataclasses.dataclass
class CounterfactualPlan:
    """Which rows are run in which order, and with what; everything a worker needs besides the
    model (it is shipped to Ray actors by pickling). Positions are indices into ``order``; the
    Mixed-Rand sample is ``order[:n_draw_rows]``, the rows with an Only-BG image
    ``order[:n_bg_rows]``."""

    sub: Dataset                    # the dataset's rows in ``order``
    order: np.ndarray               # the dataset row at each position
    rows: np.ndarray                # the dataset rows with a mask
    n_draw_rows: int
    n_bg_rows: int
    draws_for: np.ndarray           # draws per object, by class index
    pred_sorted: np.ndarray | None  # the scan's predictions in ``order`` (None: predicted here)
    batch_size: int                 # B, the pairing pool (at least _MIN_POOL)
    draws: int                      # R
    image_size: tuple
    channels: int
    preprocess: object
    seed: int
    pairing: str
    dilate: int
    mixed_per_class: int | None
    chunk_rows: int                 # a multiple of batch_size
    pools: int = 1                  # pools per compiled batch (see compute_batch)

    @property
    def compute_batch(self) -> int:
        """Rows per compiled call: ``pools`` consecutive pools of ``batch_size`` (small images
        are run several pools at a time, see :func:`pools_per_call`)."""
        return self.batch_size * self.pools

    @property
    def n_chunks(self) -> int:
        return -(-len(self.order) // self.chunk_rows)

    def chunks(self) -> list:
        """One spec per chunk: ``{"chunk": k, "lo": lo, "hi": hi}``, positions ``[lo, hi)``."""
        n = len(self.order)
        return [{"chunk": k, "lo": k * self.chunk_rows, "hi": min((k + 1) * self.chunk_rows, n)}
                for k in range(self.n_chunks)]


def plan_counterfactuals(ds: Dataset, *, image_size, channels: int, batch_size: int,
                         preprocess="none", seed: int = 0, draws: int = 4,
                         pairing: str = "background", dilate: int = 2,
                         mixed_per_class: int | None = None, predictions=None,
                         chunk_batches: int | None = None) -> CounterfactualPlan | None:
    """The driver's part before any image is read: the rows with masks, shuffled (seeded), the
    stratified sample first, then the other rows that get an Only-BG image, then the rest; the
    draws per class; the chunks. None when no image has a mask. Arguments as for
    :func:`run_counterfactuals`."""
    if pairing not in PAIRINGS:
        raise BiasscopeError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if int(batch_size) < 1:
        raise BiasscopeError(f"batch_size must be >= 1, got {batch_size}")
    if int(draws) < 1:
        raise BiasscopeError(f"draws must be >= 1, got {draws}")
    cb = CHUNK_BATCHES if chunk_batches is None else int(chunk_batches)
    if cb < 1:
        raise BiasscopeError(f"chunk_batches must be >= 1, got {chunk_batches}")
    B, R = max(int(batch_size), _MIN_POOL), int(draws)
    H, W = (int(s) for s in image_size)
    rows = np.flatnonzero(_rows_with_masks(ds))
    if rows.size == 0:
        return None
    if predictions is not None:
        predictions = np.asarray(predictions, np.int64)
        if predictions.shape != (len(ds),):
            raise BiasscopeError(f"predictions must have one entry per image ({len(ds)}), "
                                 f"got shape {predictions.shape}")
    # Shuffled rows: every batch mixes classes, so backgrounds of other classes are at hand.
    perm = np.random.default_rng([int(seed), 0]).permutation(rows.size)
    sampled = stratified_sample(ds.table, rows, mixed_per_class, ds.attributes, seed)[perm]
    shuffled = rows[perm]
    labels_all = ds.table["label_idx"].to_numpy(np.int64)
    if predictions is None:
        bg_rows = np.ones(rows.size, bool)  # originals unknown: Only-BG everywhere
    else:  # Only-BG on the sample and on every mistake (the explanations read those)
        bg_rows = sampled | ((predictions[shuffled] >= 0) & (predictions[shuffled] != labels_all[shuffled]))
    # the Mixed-Rand sample first, then the other rows that get an Only-BG image, then the rest:
    # batches past the sample skip the draws, batches past the Only-BG rows skip the fill
    groups = (sampled, bg_rows & ~sampled, ~bg_rows)
    order = np.concatenate([shuffled[g] for g in groups])
    n_draw_rows, n_bg_rows = int(sampled.sum()), int(bg_rows.sum())
    # draws per object: enough for about ``mixed_per_class`` draws per class, 1..draws
    lab_sorted = labels_all[order[:n_draw_rows]]
    per_class_n = np.bincount(lab_sorted, minlength=1) if n_draw_rows else np.zeros(1, np.int64)
    if mixed_per_class is None:
        draws_for = np.full(len(per_class_n), R)
    else:
        # rounded to the nearest (the sample's per-group quotas may fall a few objects short)
        draws_for = np.clip(np.floor(int(mixed_per_class) / np.maximum(per_class_n, 1) + 0.5)
                            .astype(np.int64), 1, R)
    sub = dataclasses.replace(
        ds, table=ds.table.iloc[order].reset_index(drop=True),
        arrays=None if ds.arrays is None else {
            "images": np.asarray(ds.arrays["images"])[order],
            "masks": np.asarray(ds.arrays["masks"])[order]})
    return CounterfactualPlan(
        sub=sub, order=order, rows=rows, n_draw_rows=n_draw_rows, n_bg_rows=n_bg_rows,
        draws_for=draws_for, pred_sorted=None if predictions is None else predictions[order],
        batch_size=B, draws=R, image_size=(H, W), channels=int(channels), preprocess=preprocess,
        seed=int(seed), pairing=pairing, dilate=int(dilate),
        mixed_per_class=None if mixed_per_class is None else int(mixed_per_class),
        chunk_rows=cb * B, pools=pools_per_call(B, H, W))


#: Small images are run several pairing pools per compiled call, up to this many rows and this
#: many pixels in all: TF's per-op overhead dominates a batch of 16 small images (on 2 cores a
#: batch of 64 images of 64 px costs about a third less per image than four of 16, for the
#: fill and for the demo CNN's forward pass alike), while large images keep the scan's batch.
CALL_ROWS, CALL_PIXELS = 64, 64 * 64 * 64


def pools_per_call(batch_size: int, H: int, W: int) -> int:
    """Pools of ``batch_size`` rows per compiled call: the largest power of two that keeps a
    call within :data:`CALL_ROWS` rows and :data:`CALL_PIXELS` pixels (at least 1)."""
    fit = min(CALL_ROWS // int(batch_size), CALL_PIXELS // (int(batch_size) * int(H) * int(W)))
    return 1 << max(0, int(fit).bit_length() - 1) if fit >= 1 else 1


class CounterfactualSteps:
    """The three compiled steps of a chunk for one model (built once per process or actor):
    ``with_only_bg`` (Only-BG fill and prediction, Only-FG prediction and embedding, and the
    originals' prediction when the scan's are not given), ``without_only_bg`` (the same without
    the fill) and ``mixed_rand`` (objects pasted on a batch's Only-BG images)."""

    def __init__(self, model, plan: CounterfactualPlan, *, target=None):
        from .cams import compiled_forward, resolve_preprocess
        from .model import Capture

        B, C = plan.compute_batch, plan.channels
        H, W = plan.image_size
        dilate = plan.dilate
        forward = compiled_forward(model, batch_size=B, input_shape=(H, W, C), preprocess=plan.preprocess)
        classify, head = _classifier(model)

        def predict(x):
            return classify(forward(x))
        img_spec = tf.TensorSpec((B, H, W, C), tf.float32)
        mask_spec = tf.TensorSpec((B, H, W), tf.bool)

        pre = resolve_preprocess(plan.preprocess)
        with_orig = plan.pred_sorted is None

        def only_fg_pass(images, masks):
            fg = only_foreground(images, masks)
            p_orig = predict(images) if with_orig else tf.zeros((B,), tf.int32)
            if target is None:
                return predict(fg), tf.zeros((B, 0), tf.float32), p_orig
            # The model is called directly (not through the compiled `forward`, whose graph may
            # be traced already) so that the wrapped target layer is part of this graph.
            with Capture(target, head) as cap:
                out = model(pre(fg), training=False)
            return classify(out), tf.reduce_mean(tf.cast(cap.activations, tf.float32), axis=(1, 2)), p_orig

        # plain graph code (no Python control flow on tensors): autograph's source conversion
        # would only cost time (tracing with_only_bg: 1.9 s with it, 0.6 s without)
        @tf.function(input_signature=[img_spec, mask_spec], autograph=False)
        def with_only_bg(images, masks):
            only_bg = fill_background(images, masks, dilate=dilate)
            p_fg, emb, p_orig = only_fg_pass(images, masks)
            return only_bg, p_orig, predict(only_bg), p_fg, emb

        @tf.function(input_signature=[img_spec, mask_spec], autograph=False)
        def without_only_bg(images, masks):
            return only_fg_pass(images, masks)

        @tf.function(input_signature=[img_spec, mask_spec, img_spec, tf.TensorSpec((B,), tf.int32)],
                     autograph=False)
        def mixed_rand(images, masks, only_bg, source):
            return predict(paste_objects(images, masks, only_bg, source))

        self.with_only_bg, self.without_only_bg, self.mixed_rand = with_only_bg, without_only_bg, mixed_rand


def run_chunk(steps: CounterfactualSteps, plan: CounterfactualPlan, chunk: int, lo: int, hi: int,
              advance=None, batches=None) -> dict | None:
    """The tests on positions ``[lo, hi)`` of ``plan.order`` (the chunk's last batch is
    padded): per valid row its position, label, the predictions, the embedding and the draws
    (``pos`` ... ``tier``, as numpy arrays), or None when no image of the chunk could be read.
    A batch holds ``plan.pools`` pairing pools of ``plan.batch_size`` consecutive rows; each
    pool's backgrounds are drawn from the pool, pool after pool. The pairing RNG is the chunk's
    own, ``default_rng([seed, 1, chunk])``: the result is a function of the plan and the chunk.
    ``batches``: the chunk's input batches when the caller has them (:func:`run_chunks`),
    else its own pipeline is built."""
    from .pipeline import make_pipeline

    P, R = plan.batch_size, plan.draws
    H, W = plan.image_size
    draws_for, pred_sorted = plan.draws_for, plan.pred_sorted
    pipe = batches if batches is not None else make_pipeline(
        plan.sub, image_size=(H, W), channels=plan.channels, batch_size=plan.compute_batch,
        start=int(lo), stop=int(hi))
    parts: dict = {k: [] for k in _PART_KEYS}
    pair_rng = np.random.default_rng([plan.seed, 1, int(chunk)])
    for batch in pipe:
        pos = np.asarray(batch["index"])
        labels, mask_np = np.asarray(batch["label"]), np.asarray(batch["mask"])
        valid = (pos >= 0) & np.asarray(batch["has_mask"]) & mask_np.any(axis=(1, 2))
        # tensors once: the Only-BG/Only-FG step and each Mixed-Rand draw take the same batch
        images, mask = tf.convert_to_tensor(batch["image"], tf.float32), tf.convert_to_tensor(mask_np, tf.bool)
        has_bg = valid & (pos < plan.n_bg_rows)
        if has_bg.any():
            only_bg, p_orig, p_bg, p_fg, emb = steps.with_only_bg(images, mask)
            p_bg = np.where(has_bg, p_bg.numpy(), -1)
        else:
            p_fg, emb, p_orig = steps.without_only_bg(images, mask)
            only_bg, p_bg = None, np.full(len(pos), -1, np.int64)
        p_orig = p_orig.numpy() if pred_sorted is None else pred_sorted[np.maximum(pos, 0)]
        draw = valid & (pos < plan.n_draw_rows)  # rows past the Mixed-Rand sample get no draws
        n_draws = draws_for[np.minimum(labels, len(draws_for) - 1)]
        # the pairings, pool by pool (a pool of padding only is no pool): sources as rows of
        # the batch (-1: none)
        src_row = np.full((len(pos), R), -1, np.int64)
        tier = np.full((len(pos), R), -1, np.int8)
        for q in range(0, len(pos), P):
            sl = slice(q, q + P)
            if not (pos[sl] >= 0).any():
                continue
            for j in range(R):
                s, t = _pair(labels[sl], p_bg[sl], draw[sl], pair_rng, plan.pairing)
                more = n_draws[sl] > j
                src_row[sl, j] = np.where(more & (s >= 0), s + q, -1)
                tier[sl, j] = np.where(more, t, -1)
        mixed = np.full((len(pos), R), -1, np.int64)
        for j in range(R):
            s = src_row[:, j]
            if (s >= 0).any():  # no pair in the batch (past the sample, or no more draws): no pass
                p = steps.mixed_rand(images, mask, only_bg, np.maximum(s, 0).astype(np.int32)).numpy()
                mixed[:, j] = np.where(s >= 0, p, -1)
        # sources as positions in the shuffled order (-1: none)
        src = np.where(src_row >= 0, pos[np.maximum(src_row, 0)], -1)
        parts["pos"].append(pos[valid])
        parts["label"].append(labels[valid])
        parts["orig"].append(p_orig[valid])
        parts["only_bg"].append(p_bg[valid])
        parts["only_fg"].append(p_fg.numpy()[valid])
        parts["emb"].append(emb.numpy()[valid])
        parts["mixed"].append(mixed[valid])
        parts["src"].append(src[valid])
        parts["tier"].append(tier[valid])
        if advance is not None:
            advance(int((pos >= 0).sum()))
    if not parts["pos"]:
        return None
    return {k: np.concatenate(v) for k, v in parts.items()}


#: Chunks the local runner runs at once from the decoded copy (at most one per core): between
#: two compiled calls of a chunk the cores idle while numpy builds the next batch and draws the
#: pairings, and a second chunk's calls fill that time.
LOCAL_CHUNK_THREADS = 2


def run_chunks(steps: CounterfactualSteps, plan: CounterfactualPlan, specs: list, advance=None,
               inputs=None, threads: int | None = None) -> dict:
    """:func:`run_chunk` over consecutive chunks ``specs`` (from :meth:`CounterfactualPlan.chunks`)
    from one input pipeline (one per chunk costs about 0.2 s each to build and start); the
    same batches, so the same results. ``inputs``: the CAM pass's decoded images
    (:class:`biasscope.decoded.DecodedInputs`); when usable, the batches are built from them,
    no file is read, and ``threads`` chunks (default :data:`LOCAL_CHUNK_THREADS`, at most the
    cores) run at once, each from its own batches. ``{chunk: result}``."""
    from .pipeline import make_pipeline

    if not specs:
        return {}
    out: dict = {s["chunk"]: None for s in specs}
    spec_of = {s["chunk"]: s for s in specs}
    lo, hi = int(specs[0]["lo"]), int(specs[-1]["hi"])
    if inputs is not None and inputs.usable and tuple(inputs.shape) == (*plan.image_size, plan.channels):
        labels = plan.sub.table["label_idx"].to_numpy(np.int32)

        def one(s):
            batches = inputs.batches(plan.order, labels, batch_size=plan.compute_batch, start=s["lo"],
                                     stop=s["hi"], chunk_rows=plan.chunk_rows)
            return s["chunk"], run_chunk(steps, plan, s["chunk"], s["lo"], s["hi"], advance=advance,
                                         batches=batches)
        n = min(LOCAL_CHUNK_THREADS if threads is None else int(threads), os.cpu_count() or 1, len(specs))
        if n <= 1:
            out.update(map(one, specs))
        else:
            pool = ThreadPoolExecutor(n)
            try:  # the chunks in order: the sample's come first
                out.update(pool.map(one, specs))
            finally:  # on Ctrl-C or an error, the chunks not begun are dropped, not run
                pool.shutdown(wait=True, cancel_futures=True)
        return out
    pipe = make_pipeline(plan.sub, image_size=plan.image_size, channels=plan.channels,
                         batch_size=plan.compute_batch, start=lo, stop=hi, chunk_rows=plan.chunk_rows)

    def chunk_of(batch) -> int:  # every batch holds at least one real row of its chunk
        return int(np.asarray(batch["index"]).max()) // plan.chunk_rows

    for k, group in itertools.groupby(pipe, key=chunk_of):
        s = spec_of[k]
        out[k] = run_chunk(steps, plan, k, s["lo"], s["hi"], advance=advance, batches=group)
    return out


def aggregate_counterfactuals(plan: CounterfactualPlan, ds: Dataset, chunks: list, *, n_classes: int,
                              n_boot: int, target_path: str | None = None, engine: dict | None = None,
                              t0: float | None = None) -> dict:
    """The result of :func:`run_counterfactuals` from its chunks' results (in chunk order; None
    for a chunk with no readable image): back to dataset row order, the per-class figures."""
    t0 = time.perf_counter() if t0 is None else t0
    seed, R, B = plan.seed, plan.draws, plan.batch_size
    H, W = plan.image_size
    order, rows, n_draw_rows = plan.order, plan.rows, plan.n_draw_rows
    draws_for, pairing, dilate, mixed_per_class = plan.draws_for, plan.pairing, plan.dilate, plan.mixed_per_class
    got = [c for c in chunks if c is not None]
    empty = {"mixed": (0, R), "src": (0, R), "tier": (0, R), "emb": (0, 0)}
    cat = {k: (np.concatenate([c[k] for c in got]) if got else np.zeros(empty.get(k, (0,)), np.int64))
           for k in _PART_KEYS}
    if cat["pos"].size == 0:
        return {"skipped": "no usable masks (empty at the model's input size, or unreadable)"}
    # back to dataset row order
    shuffled_pos = cat["pos"]
    index = order[shuffled_pos]
    srt = np.argsort(index, kind="stable")
    index = index[srt]
    label, orig, only_bg, only_fg, mixed, tier, emb = (
        cat[k][srt] for k in ("label", "orig", "only_bg", "only_fg", "mixed", "tier", "emb"))
    in_sample = shuffled_pos[srt] < n_draw_rows  # the stratified sample: Only-BG and draws
    src_shuffled = cat["src"][srt]
    src = np.where(src_shuffled >= 0, order[np.maximum(src_shuffled, 0)], -1)
    label_by_pos = np.full(max(len(order), 1), -1, dtype=np.int64)
    label_by_pos[shuffled_pos] = cat["label"]
    src_label = np.where(src_shuffled >= 0, label_by_pos[np.maximum(src_shuffled, 0)], -1)

    chance = 1.0 / max(n_classes, 1)
    classes = {c: _class_stats(int(ds.class_index[c]), label, orig, only_bg, only_fg, mixed,
                               src_label, tier, in_sample, seed=seed, n_boot=int(n_boot), chance=chance)
               for c in ds.classes}
    paths = ds.table["path"].astype(str).to_numpy()
    tiers = {"2": ("another class, background not read as the object's class"
                   if pairing == "background" else "another class"),
             "1": "another class, background read as the object's class (excluded from bg_gap)",
             "0": "same class: no other class in the batch (excluded)"}
    result = {
        "classes": classes,
        "n_images": int(len(ds)),
        "n_with_mask": int(index.size),
        "n_skipped": {"no_mask": int(len(ds) - rows.size),
                      "empty_or_unreadable": int(rows.size - index.size)},
        "n_classes": int(n_classes),
        "seed": int(seed),
        "n_boot": int(n_boot),
        "method": {
            "only_fg": (f"the object's mask pixels on a flat grey canvas ({_FG_FILL:g} in the "
                        "0..255 input range)"),
            "only_bg": (f"object mask dilated by {int(dilate)} px; hole filled with a smooth "
                        "colour field by push-pull normalised convolution (blur(img*keep) / "
                        f"blur(keep), {_FILL_SIGMA:g}-px Gaussian on each level of an "
                        "area-downsampled pyramid, blended from the coarsest level down to "
                        f"level {_DETAIL_LEVEL}, a level trusted in full where >= {_FILL_TRUST:.0%} of its "
                        "window is background), plus background texture detail copied from "
                        "the first of a fixed list of shifted positions that is background"),
            "mixed_rand": (f"{R} draw(s) per object: the object's mask pixels (not dilated) "
                           "pasted onto the Only-BG image of another image of the same batch "
                           "(rows shuffled with the seed), drawn uniformly with replacement "
                           "from the best available tier"),
            "pairing": pairing,
            "pair_tiers": tiers,
            "draws": R, "batch_size": B, "rows_per_call": plan.compute_batch,
            "image_size": [H, W], "dilate": int(dilate),
            "mixed_rand_sample": {
                "per_class": None if mixed_per_class is None else int(mixed_per_class),
                "stratified_by": ["label", *[a for a in ds.attributes if a in ds.table.columns]],
                "n_objects": int((mixed[:, 0] >= 0).sum()) if len(mixed) else 0,
                "n_objects_by_class": {c: int(((label == ds.class_index[c]) & (mixed[:, 0] >= 0)).sum())
                                       for c in ds.classes},
                "draws_per_object": {c: int(draws_for[min(int(ds.class_index[c]), len(draws_for) - 1)])
                                     for c in ds.classes},
                "n_only_bg": int((only_bg >= 0).sum()),
                "only_bg_rows": ("the sample and the mistakes" if plan.pred_sorted is not None
                                 else "every image"),
                "why": "Mixed-Rand, transplant and the Only-BG rates on a stratified per-class "
                       "sample sized for a 95% CI half-width of about 0.03 on their rates (draws "
                       "per object: about that many per class); Only-BG images also for every "
                       "mistake (the explanations read them), Only-FG on every image",
            },
            "chunks": {"n": plan.n_chunks, "rows": plan.chunk_rows,
                       "pairing_rng": "per chunk: default_rng([seed, 1, chunk])"},
            "engine": dict(engine or {"name": "local"}),
            "ci": ("percentile bootstrap 95%, images resampled (an image's draws together), "
                   "paired for bg_gap"),
        },
        "per_image": {
            "index": index, "path": paths[index], "label_idx": label, "orig_pred": orig,
            "only_bg_pred": only_bg, "only_fg_pred": only_fg, "in_sample": in_sample,
            "mixed_pred": mixed[:, 0],
            "bg_source_index": src[:, 0], "pair_tier": tier[:, 0], "mixed_pred_all": mixed,
            "bg_source_index_all": src, "pair_tier_all": tier,
        },
        "class_names": {str(k): v for k, v in ds.output_names.items()},
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    result = to_jsonable(result)
    if target_path is not None:
        result["object_embedding"] = {"index": index, "features": emb.astype(np.float32),
                                      "layer": target_path}
    return result
