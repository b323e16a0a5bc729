"""The CAM pass's decoded model inputs, kept in memory for the counterfactual pass.

Decoding and resizing an image and its mask costs about as much as a forward pass of a small
model (0.4 ms per 64-px image and mask on 2 cores, against 0.37 ms for the demo CNN's forward
pass), and the counterfactual pass reads every image with a mask again. The local engine's CAM
pass therefore keeps what its pipeline produced -- the pixels as uint8, the masks bit-packed --
when that is exact and fits a memory budget, and the counterfactual pass builds its batches from
it (:meth:`DecodedInputs.batches`): the same batches, element for element, as its own
:func:`biasscope.pipeline.make_pipeline` would give, so the same results.

Exact means every pixel the pipeline produced is an integer in 0..255 (images stored at the
model's input size; a resized image has fractional values and turns the copy off). Rows the
pipeline could not decode are missing here as they are there. The copy is used only when it
covers the whole dataset (a pass resumed from stored chunks did not see the earlier rows).

numpy only.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

__all__ = ["DEFAULT_BUDGET", "DecodedInputs"]


def _default_budget() -> int:
    """At most 2 GiB and an eighth of the machine's memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(min(2 << 30, ram // 8))


#: Bytes the copy may take (pixels plus packed masks).
DEFAULT_BUDGET = _default_budget()


def _buffer(shape) -> np.ndarray:
    """A uint8 array whose pages are mapped at once (``MAP_POPULATE`` where the system has it):
    faulting them in one by one while the pass fills them costs about 6x more (0.38 s against
    0.06 s for 123 MB here)."""
    n = int(np.prod(shape))
    flag = getattr(mmap, "MAP_POPULATE", 0)
    if n and flag:
        try:
            buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
            return np.frombuffer(buf, np.uint8).reshape(shape)
        except (OSError, ValueError):
            pass
    return np.empty(shape, np.uint8)


class DecodedInputs:
    """uint8 pixels (n, H, W, C) and bit-packed masks of dataset rows, filled batch by batch.

    ``put`` stores a batch's valid rows and turns the copy off (``ok`` False, memory freed) at
    the first image that was resized (its pixels are not integers). ``complete`` is set by whoever ran the
    whole pass: then a row not stored is one the pipeline dropped.
    """

    def __init__(self, n: int, H: int, W: int, C: int):
        self.shape = (int(H), int(W), int(C))
        self.n = int(n)
        self.images = _buffer((self.n, *self.shape))
        self.masks = _buffer((self.n, -(-self.shape[0] * self.shape[1] // 8)))
        self.has_mask = np.zeros(self.n, bool)
        self.stored = np.zeros(self.n, bool)
        self.ok = True
        self.complete = False

    @classmethod
    def create(cls, n: int, H: int, W: int, C: int, budget: int | None = None) -> "DecodedInputs | None":
        """A copy for ``n`` rows, or None when it would take more than ``budget`` bytes."""
        per_row = int(H) * int(W) * int(C) + -(-int(H) * int(W) // 8)
        if n < 1 or n * per_row > (DEFAULT_BUDGET if budget is None else int(budget)):
            return None
        return cls(n, H, W, C)

    @property
    def usable(self) -> bool:
        return self.ok and self.complete

    def drop(self) -> None:
        """Turn the copy off and free its memory."""
        self.ok = False
        self.images = self.masks = np.zeros((0,), np.uint8)

    def put(self, index, images, masks, has_mask, image_hw) -> None:
        """Store rows ``index`` (dataset rows): ``images`` (b, H, W, C) float 0..255, ``masks``
        (b, H, W) bool, ``has_mask`` (b,), ``image_hw`` (b, 2) the sizes they were decoded at
        (an image not at the model's size was resized: its pixels are not integers)."""
        if not self.ok or len(index) == 0:
            return
        x = np.asarray(images)
        if x.shape[1:] != self.shape or not (np.asarray(image_hw) == self.shape[:2]).all():
            self.drop()
            return
        u = x.astype(np.uint8)  # exact: decoded uint8 values
        index = np.asarray(index, np.int64)
        m = np.asarray(masks, bool).reshape(len(index), -1)
        self.images[index] = u
        self.masks[index] = np.packbits(m, axis=1)
        self.has_mask[index] = np.asarray(has_mask, bool)
        self.stored[index] = True

    def batches(self, order: np.ndarray, labels: np.ndarray, *, batch_size: int, start: int,
                stop: int, chunk_rows: int):
        """The batches :func:`biasscope.pipeline.make_pipeline` gives over positions
        ``[start, stop)`` of a dataset reordered by ``order`` (position -> dataset row) with
        ``chunk_rows``: within each chunk the rows that were decoded, in order, in batches of
        ``batch_size``, the chunk's last one padded (index -1, zeros). Dicts of numpy arrays
        ``index`` (positions), ``label`` (``labels`` by position), ``image`` float32,
        ``mask``, ``has_mask``."""
        H, W, C = self.shape
        B = int(batch_size)
        for lo in range(int(start), int(stop), int(chunk_rows)):
            pos = np.arange(lo, min(lo + int(chunk_rows), int(stop)), dtype=np.int64)
            pos = pos[self.stored[order[pos]]]
            for b in range(0, len(pos), B):
                p = pos[b:b + B]
                rows = order[p]
                k = len(p)
                image = np.zeros((B, H, W, C), np.float32)
                image[:k] = self.images[rows]
                mask = np.zeros((B, H * W), bool)
                mask[:k] = np.unpackbits(self.masks[rows], axis=1, count=H * W).astype(bool)
                has = np.zeros(B, bool)
                has[:k] = self.has_mask[rows]
                index = np.full(B, -1, np.int64)
                index[:k] = p
                label = np.zeros(B, np.int32)
                label[:k] = labels[p]
                yield {"index": index, "label": label, "image": image,
                       "mask": mask.reshape(B, H, W), "has_mask": has}
