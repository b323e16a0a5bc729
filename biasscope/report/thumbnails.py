"""Thumbnails for the report: the image, its CAM overlay with the mask outline, small JPEGs.

Everything is drawn with numpy and Pillow from the stored scan and the image/mask files: the
CAM (stored at the target layer's resolution, peak 1) is upsampled bilinearly to the thumbnail,
coloured with a jet-like map and blended over the image; the mask (a mask file, or a box from
the table's ``x0..y1`` columns in original image pixels) is drawn as a one-pixel outline.

Which images get thumbnails is :func:`choose_rows`: every image of a scan up to
:data:`FULL_BELOW` images; above that only the images the report shows first (finding
examples, a sample of every cluster) and the flagged ones, up to :data:`MAX_THUMBS` in all, so a
10,000-image report stays small and fast to open.
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from biasscope.metrics import upsample_bilinear

__all__ = ["FULL_BELOW", "MAX_THUMBS", "SIZE", "MaskSource", "PendingThumbnails", "choose_rows",
           "colorize", "mask_sources", "outline", "render_thumbnails", "start_thumbnails", "heatmap_uri"]

#: Scans up to this many images get a thumbnail for every image.
FULL_BELOW = 2000
#: Above FULL_BELOW, at most this many images carry thumbnails.
MAX_THUMBS = 1200
#: Of those, at most this many are cluster samples (a few per cluster).
CLUSTER_SAMPLE_BUDGET = 300
#: Longest side of a thumbnail, in pixels.
SIZE = 96
JPEG_QUALITY = 78
#: Weight of the colour map in the CAM overlay, from CAM = 0 to CAM = peak: the hot spots
#: stand out and the image stays readable where the model does not look.
CAM_ALPHA = (0.3, 0.7)
OUTLINE_RGB = np.array([1.0, 1.0, 1.0], np.float32)


def colorize(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map: values in [0, 1] (any shape) -> RGB floats in [0, 1], shape (..., 3)."""
    v = np.clip(np.asarray(v, np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], np.float32)  # red, green, blue peaks at 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (4-neighbourhood; the image border counts as
    outside, so an object cut by the frame is closed along it)."""
    m = np.asarray(mask, bool)
    p = np.pad(m, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def _jpeg_uri(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_uri(heat, size: int = SIZE) -> str:
    """A coloured heatmap (e.g. a cluster's mean CAM) as a PNG data URI, scaled to peak 1."""
    h = np.nan_to_num(np.asarray(heat, np.float32), nan=0.0)
    peak = float(h.max()) if h.size else 0.0
    h = h / peak if peak > 0 else h
    big = upsample_bilinear(h[None], (size, size))[0]
    buf = io.BytesIO()
    Image.fromarray(np.round(colorize(big) * 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class MaskSource:
    """Where an image's mask comes from: a mask file, or a box in original image pixels."""

    file: str | None = None
    box: tuple | None = None


def mask_sources(table: pd.DataFrame, meta: dict, rows=None) -> list:
    """Per row, a :class:`MaskSource` or None, resolved as :mod:`biasscope.data` resolves them
    (only for the positions ``rows`` when given, e.g. the rows that get thumbnails; None for
    the others).

    * box columns ``x0, y0, x1, y1`` in the table: a box;
    * ``DATA/manifest.csv`` with a ``mask`` column: that file (relative to DATA);
    * directory layout: ``DATA/masks/<path below images/ with .png>``, or below the masks folder
      recorded in the scan's options when the scan was given ``--masks``.

    Only rows with mask-based metrics (``inside_frac`` not null) are looked up: the others had
    no usable mask when scanned. A file that does not exist gives None (no outline).
    """
    n = len(table)
    root = Path(str(meta.get("data_root") or "."))
    paths = table["path"].astype(str).to_numpy() if "path" in table.columns else np.array([""] * n)
    has = (pd.to_numeric(table["inside_frac"], errors="coerce").notna().to_numpy()
           if "inside_frac" in table.columns else np.zeros(n, bool))
    box = None
    if all(c in table.columns for c in ("x0", "y0", "x1", "y1")):
        box = table[["x0", "y0", "x1", "y1"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    manifest_masks = _manifest_masks(root)
    opts = meta.get("options") or {}
    masks_dir = meta.get("masks") or opts.get("masks")
    out: list = [None] * n
    if rows is not None:
        keep = np.zeros(n, bool)
        keep[np.asarray(rows, np.int64)] = True
        has = has & keep
    for i in np.flatnonzero(has):
        if box is not None and np.isfinite(box[i]).all():
            out[i] = MaskSource(box=tuple(float(v) for v in box[i]))
            continue
        f = _mask_file(paths[i], root, manifest_masks, masks_dir)
        if f is not None and os.path.isfile(f):
            out[i] = MaskSource(file=f)
    return out


def _manifest_masks(root: Path) -> dict | None:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return None
    try:
        df = pd.read_csv(manifest, dtype=str, usecols=lambda c: c in ("path", "mask"))
    except Exception:  # an unreadable manifest only costs the outlines
        return None
    if "path" not in df.columns or "mask" not in df.columns:
        return {}
    return {p: m for p, m in zip(df["path"], df["mask"]) if isinstance(p, str) and isinstance(m, str) and m}


def _mask_file(path: str, root: Path, manifest_masks, masks_dir) -> str | None:
    if manifest_masks is not None:
        m = manifest_masks.get(path)
        return str(root / m) if m else None
    rel = Path(path)
    if rel.is_absolute():
        return None
    if masks_dir:
        sub = rel.relative_to("images") if rel.parts and rel.parts[0] == "images" else rel
        return str(Path(masks_dir) / sub.with_suffix(".png"))
    if rel.parts and rel.parts[0] == "images":
        return str(root / "masks" / Path(*rel.parts[1:]).with_suffix(".png"))
    return None


def _read_thumb(file: str, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image scaled to fit ``size`` (float RGB in [0, 1]) and its original (width, height)."""
    with Image.open(file) as im:
        orig = im.size
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster
        im = im.convert("RGB")
        s = min(1.0, size / max(orig))  # never upscale: the browser scales small images for free
        tw, th = max(1, round(orig[0] * s)), max(1, round(orig[1] * s))
        im = im.resize((tw, th), Image.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, np.float32) / 255.0, orig


def _mask_outline(src: MaskSource | None, shape, orig) -> np.ndarray | None:
    th, tw = shape
    if src is None:
        return None
    if src.box is not None:
        x0, y0, x1, y1 = src.box
        sx, sy = tw / orig[0], th / orig[1]
        m = np.zeros((th, tw), bool)
        c0, c1 = int(np.clip(np.floor(x0 * sx), 0, tw - 1)), int(np.clip(np.ceil(x1 * sx) - 1, 0, tw - 1))
        r0, r1 = int(np.clip(np.floor(y0 * sy), 0, th - 1)), int(np.clip(np.ceil(y1 * sy) - 1, 0, th - 1))
        if c1 >= c0 and r1 >= r0:
            m[r0:r1 + 1, c0:c1 + 1] = True
        return outline(m)
    try:
        with Image.open(src.file) as mk:
            mk = mk.convert("L").resize((tw, th), Image.NEAREST)
            return outline(np.asarray(mk) > 0)
    except (OSError, ValueError):
        return None


def _overlay(img: np.ndarray, cam: np.ndarray, edge: np.ndarray | None) -> np.ndarray:
    th, tw = img.shape[:2]
    c = np.clip(upsample_bilinear(np.asarray(cam, np.float32)[None], (th, tw))[0], 0.0, 1.0)
    a = (CAM_ALPHA[0] + (CAM_ALPHA[1] - CAM_ALPHA[0]) * c)[..., None]
    out = (1.0 - a) * img + a * colorize(c)
    if edge is not None:
        out[edge] = OUTLINE_RGB
    return out


def render_one(file: str, cam, cam_true, mask: MaskSource | None, size: int = SIZE):
    """``[image, CAM overlay, true-class CAM overlay or None]`` as JPEG data URIs, or None when
    the image cannot be read."""
    try:
        img, orig = _read_thumb(file, size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    edge = _mask_outline(mask, img.shape[:2], orig)
    return [_jpeg_uri(img), _jpeg_uri(_overlay(img, cam, edge)),
            None if cam_true is None else _jpeg_uri(_overlay(img, cam_true, edge))]


def render_thumbnails(scan, rows, masks, *, size: int = SIZE, workers: int | None = None) -> dict:
    """Render the thumbnails of ``rows`` (positions in the table); returns {row: [uris]} for the
    images that could be read. The true-class overlay is only made for misclassified images
    (elsewhere it equals the predicted-class one)."""
    return _render_jobs(_jobs(scan, rows, masks), size, workers)


#: Fewer thumbnails than this are drawn here (sending them costs more than it saves).
HELPER_MIN = 200


class PendingThumbnails:
    """Thumbnails begun by :func:`start_thumbnails`; :meth:`result` finishes them."""

    def __init__(self, jobs: list, local: list, remote: list, helper, size: int):
        self._local, self._remote, self._helper, self._size = local, remote, helper, size
        self._order = [j[0] for j in jobs]

    def result(self) -> dict:
        """{row: [uris]} as :func:`render_thumbnails` returns it: this process's share drawn
        now, the helper's collected (or drawn here too when the helper failed)."""
        out = _render_jobs(self._local, self._size)
        got = self._helper.result() if self._helper is not None else None
        got = dict(got) if isinstance(got, list) else None
        if got is None or set(got) != {j[0] for j in self._remote}:
            got = _render_jobs(self._remote, self._size)
        out.update({r: u for r, u in got.items() if u is not None})
        return {r: out[r] for r in self._order if r in out}  # in the order of the rows asked for


def start_thumbnails(scan, rows, masks, *, size: int = SIZE) -> PendingThumbnails:
    """Begin the thumbnails of ``rows``: with a helper process (the console script's), it
    draws 2/3 of them in the background; :meth:`PendingThumbnails.result` draws the rest and
    returns all, equal to :func:`render_thumbnails`. The shares take about the same time: this
    process first builds the rest of the report (0.45 s of 1.9 s at 10,000 images)."""
    from biasscope import helper as helper_mod

    jobs = _jobs(scan, rows, masks)
    helper = helper_mod.current()
    if helper is None or len(jobs) < HELPER_MIN:
        return PendingThumbnails(jobs, jobs, [], None, size)
    # every third job stays here: the two shares alike in kind (finding examples, clusters)
    local = jobs[::3]
    remote = [j for i, j in enumerate(jobs) if i % 3]
    if not helper.submit("thumbnails", (remote, size)):
        return PendingThumbnails(jobs, jobs, [], None, size)
    return PendingThumbnails(jobs, local, remote, helper, size)


def _jobs(scan, rows, masks) -> list:
    """(row, image file, CAM, true-class CAM or None, mask source) per row."""
    table = scan.table
    root = Path(str(scan.meta.get("data_root") or "."))
    paths = table["path"].astype(str).to_numpy()
    correct = table["correct"].to_numpy(dtype=bool)
    out = []
    for r in (int(r) for r in rows):
        cam = np.asarray(scan.heatmaps[r], np.float32)
        cam_t = None if correct[r] else np.asarray(scan.heatmaps_true[r], np.float32)
        out.append((r, str(root / paths[r]), cam, cam_t, masks[r]))
    return out


def _render_jobs(jobs: list, size: int, workers: int | None = None) -> dict:
    # Pillow releases the GIL while decoding, resizing and encoding, but the overlay (numpy on
    # 96-px arrays) holds it: on 2 cores one thread is fastest (1,200 thumbnails of 64 px:
    # 1.4-1.6 s, against 1.8-1.9 s with 2 threads and 2.0-2.1 s with 3).
    cpus = os.cpu_count() or 1
    workers = workers or (1 if cpus <= 2 else min(4, cpus))

    def job(j):
        r, file, cam, cam_t, mask = j
        return r, render_one(file, cam, cam_t, mask, size)

    out = {}
    pool = ThreadPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None
    try:
        for r, uris in (map(job, jobs) if pool is None else pool.map(job, jobs)):
            if uris is not None:
                out[r] = uris
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def choose_rows(table: pd.DataFrame, findings, analysis: dict, *, full_below: int = FULL_BELOW,
                max_thumbs: int = MAX_THUMBS, cluster_budget: int = CLUSTER_SAMPLE_BUDGET) -> np.ndarray:
    """Positions of the rows that get thumbnails, ascending.

    Up to ``full_below`` images: all. Above: in this order until ``max_thumbs``: the examples of
    every finding, a sample of every cluster (its most typical members, a share of
    ``cluster_budget``), then the flagged images, most flags first, then most confident.
    """
    n = len(table)
    if n <= full_below:
        return np.arange(n)
    paths = table["path"].astype(str).to_numpy()
    first_row: dict = {}
    for i, p in enumerate(paths):
        first_row.setdefault(p, i)
    chosen: dict = {}

    def take(i):
        if i is not None and len(chosen) < max_thumbs:
            chosen.setdefault(int(i), None)

    for f in findings:
        for p in list(f.get("examples") or [])[:10]:
            take(first_row.get(str(p)))
    clusters = analysis.get("clusters") or []
    per_cluster = max(1, min(10, cluster_budget // max(1, len(clusters))))
    for cl in clusters:
        for p in list(cl.get("examples") or [])[:per_cluster]:
            take(first_row.get(str(p)))
    if "flags" in table.columns:
        n_flags = np.array([len(f) if f is not None else 0 for f in table["flags"]], np.int64)
        conf = pd.to_numeric(table.get("confidence", pd.Series(0.0, index=table.index)),
                             errors="coerce").fillna(0.0).to_numpy()
        flagged = np.flatnonzero(n_flags > 0)
        for i in flagged[np.lexsort((flagged, -conf[flagged], -n_flags[flagged]))]:
            if len(chosen) >= max_thumbs:
                break
            take(i)
    return np.array(sorted(chosen), dtype=np.int64)
