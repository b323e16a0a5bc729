"""The tf.data input pipeline: parallel decode + resize, masks, fixed-size padded batches.

Every element carries its row index, so images that cannot be decoded are dropped inside the
pipeline (``ignore_errors``) without per-image Python, and found afterwards as gaps in the
indices. The last batch is padded to the fixed batch size (index -1) so the compiled CAM function
sees exactly one input signature.
"""

from __future__ import annotations


import numpy as np

from ._tf import import_tf  # noqa: E402

tf = import_tf()

from .data import Dataset  # noqa: E402

AUTOTUNE = tf.data.AUTOTUNE


def _decode(path, channels):
    raw = tf.io.read_file(path)
    is_webp = tf.strings.regex_full_match(tf.strings.lower(path), r".*\.webp")
    img = tf.cond(
        is_webp,
        lambda: tf.io.decode_webp(raw)[0][..., :3],  # frames first; RGBA -> RGB
        lambda: tf.io.decode_image(raw, channels=3, expand_animations=False),
    )
    img = tf.ensure_shape(img, [None, None, 3])
    if channels == 1:
        img = tf.image.rgb_to_grayscale(img)
    return img


def make_pipeline(ds: Dataset, *, image_size: tuple, channels: int, batch_size: int,
                  start: int = 0, stop: int | None = None,
                  chunk_rows: int | None = None) -> tf.data.Dataset:
    """Batches of dicts: index, image (B,H,W,C) float32 0..255, mask (B,H,W) bool, has_mask,
    image_hw and mask_hw (original sizes, for the aspect-ratio check), over the rows
    ``start:stop`` (an engine's chunk; default to the end).

    With ``chunk_rows``, the rows are cut into chunks of that many from ``start`` and no batch
    spans two chunks (each chunk's last batch is padded): the batches of one pipeline over
    several chunks are those of one pipeline per chunk, without building one per chunk."""
    H, W = (int(s) for s in image_size)
    stop = len(ds) if stop is None else min(int(stop), len(ds))
    if ds.arrays is not None:
        return _array_pipeline(ds, H, W, channels, batch_size, start, stop, chunk_rows)
    t = ds.table.iloc[start:stop]
    box = t[["x0", "y0", "x1", "y1"]].to_numpy(dtype="float32")
    src = tf.data.Dataset.from_tensor_slices({
        "index": np.arange(start, start + len(t), dtype=np.int64),
        "file": t["file"].to_numpy(dtype=str),
        "label": t["label_idx"].to_numpy(dtype=np.int32),
        "mask_file": t["mask_file"].to_numpy(dtype=str),
        "box": box,
    })

    @tf.autograph.experimental.do_not_convert  # plain graph code: skip autograph's conversion
    def load(el):
        img = _decode(el["file"], channels)
        hw = tf.shape(img)[:2]
        # most validation sets are stored at the model's size: skip the resize for those
        image = tf.cond(tf.reduce_all(hw == (H, W)),
                        lambda: tf.cast(img, tf.float32),
                        lambda: tf.image.resize(tf.cast(img, tf.float32), (H, W), method="bilinear"))
        has_file = tf.strings.length(el["mask_file"]) > 0
        has_box = tf.reduce_all(tf.math.is_finite(el["box"]))

        def from_file():
            m = tf.io.decode_png(tf.io.read_file(el["mask_file"]), channels=1)
            mhw = tf.shape(m)[:2]
            m = tf.cond(tf.reduce_all(mhw == (H, W)), lambda: m,
                        lambda: tf.image.resize(m, (H, W), method="nearest"))[..., 0] > 0
            return m, mhw

        def from_box():
            sy = tf.cast(H, tf.float32) / tf.cast(hw[0], tf.float32)
            sx = tf.cast(W, tf.float32) / tf.cast(hw[1], tf.float32)
            yy = (tf.range(H, dtype=tf.float32) + 0.5) / sy
            xx = (tf.range(W, dtype=tf.float32) + 0.5) / sx
            b = el["box"]
            in_y = (yy >= b[1]) & (yy < b[3])
            in_x = (xx >= b[0]) & (xx < b[2])
            return in_y[:, None] & in_x[None, :], hw

        def none():
            return tf.zeros((H, W), tf.bool), hw

        mask, mhw = tf.case([(has_file, from_file), (has_box, from_box)], default=none)
        return {
            "index": el["index"],
            "label": el["label"],
            "image": tf.ensure_shape(image, (H, W, channels)),
            "mask": tf.ensure_shape(mask, (H, W)),
            "has_mask": has_file | has_box,
            "image_hw": hw,
            "mask_hw": mhw,
        }

    return _batched(src, lambda d: d.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
                    .ignore_errors(), batch_size, chunk_rows)


def _batched(src, elements, batch_size, chunk_rows=None):
    """``elements(src)`` (the loaded elements) in padded batches, within chunks of
    ``chunk_rows`` source elements when given."""
    @tf.autograph.experimental.do_not_convert
    def pad(batch):
        extra = batch_size - tf.shape(batch["index"])[0]

        def pad_one(key, x):
            fill = -1 if key == "index" else 0
            paddings = [[0, extra]] + [[0, 0]] * (len(x.shape) - 1)
            return tf.pad(x, paddings, constant_values=tf.cast(fill, x.dtype))

        return {k: pad_one(k, v) for k, v in batch.items()}

    def batches(d):
        return elements(d).batch(batch_size).map(pad, num_parallel_calls=1)

    if chunk_rows is None:
        out = batches(src)
    else:  # each chunk's source elements as one element, then loaded and batched on their own
        out = src.batch(int(chunk_rows)).flat_map(lambda d: batches(tf.data.Dataset.from_tensor_slices(d)))
    opts = tf.data.Options()
    opts.deterministic = True
    # No autotuning thread: the parallel map runs at the core count. Deleting the iterator of
    # an autotuned pipeline that ran for a long time waited for that thread, 30-40 s at the end
    # of a 50,000-image pass in 5 of 7 runs.
    opts.autotune.enabled = False
    return out.prefetch(2).with_options(opts)


def _array_pipeline(ds, H, W, channels, batch_size, start, stop, chunk_rows=None):
    """In-memory images: the same elements as from files, without decoding."""
    images = ds.arrays["images"][start:stop]
    masks = ds.arrays["masks"]
    n = len(images)
    src = tf.data.Dataset.from_tensor_slices({
        "index": np.arange(start, start + n, dtype=np.int64),
        "label": ds.table["label_idx"].to_numpy(dtype=np.int32)[start:stop],
        "image": images,
        "mask": masks[start:stop] if masks is not None else np.zeros((n, 1, 1), bool),
    })
    has_mask = masks is not None

    def load(el):
        img = tf.cast(el["image"], tf.float32)
        if channels == 1 and img.shape[-1] == 3:
            img = tf.image.rgb_to_grayscale(img)
        elif channels == 3 and img.shape[-1] == 1:
            img = tf.image.grayscale_to_rgb(img)
        hw = tf.shape(img)[:2]
        m = tf.cast(el["mask"], tf.uint8)[..., None]
        return {
            "index": el["index"], "label": el["label"],
            "image": tf.ensure_shape(tf.image.resize(img, (H, W), method="bilinear"), (H, W, channels)),
            "mask": tf.image.resize(m, (H, W), method="nearest")[..., 0] > 0,
            "has_mask": tf.constant(has_mask),
            "image_hw": hw, "mask_hw": hw,
        }

    return _batched(src, lambda d: d.map(load, num_parallel_calls=AUTOTUNE, deterministic=True),
                    batch_size, chunk_rows)


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"BM", "BMP"))


def sniff_format(head: bytes) -> str | None:
    """The image format from a file's first bytes (PNG, JPEG, GIF, BMP, WebP), or None."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


def _reason(file: str, decode, formats: tuple) -> str | None:
    """Why ``file`` does not decode, in the user's words (no TensorFlow internals), or None."""
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not data:
        return "empty file"
    fmt = sniff_format(data[:16])
    if fmt is None or fmt not in formats:
        return f"not a {'/'.join(formats)} image"
    try:
        decode(tf.constant(data))
    except Exception:  # TF's message names its kernels; the format and the symptom are enough
        if fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return "truncated JPEG"
        if fmt == "PNG" and b"IEND" not in data[-16:]:
            return "truncated PNG"
        return f"corrupt {fmt} image"
    return None


def why_unreadable(file: str, mask_file: str = "") -> str:
    """After the fact, for the few rows the pipeline dropped: the reason, in a few words."""
    why = _reason(file, lambda b: tf.io.decode_image(b, channels=3, expand_animations=False),
                  ("PNG", "JPEG", "GIF", "BMP", "WebP"))
    if why:
        return f"image: {why}"
    if mask_file:
        why = _reason(mask_file, lambda b: tf.io.decode_png(b, channels=1), ("PNG",))
        if why:
            return f"mask: {why}"
    return "could not be decoded"
