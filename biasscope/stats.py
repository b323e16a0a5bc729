"""Small numpy statistics shared by the counterfactual and attractor analyses (no TensorFlow)."""

from __future__ import annotations

import numpy as np

__all__ = ["boot_ratio", "interval"]

#: Up to this many distinct (num, den) rows the bootstrap draws multinomial counts.
_FEW_DISTINCT = 256


def boot_ratio(num, den, n_boot: int, rng) -> np.ndarray | None:
    """Bootstrap distribution of ``sum(num) / sum(den)``, resampling rows; ``num`` and ``den``
    are per-row sums (an image's several draws, or a background's, stay together). None when
    there is nothing to resample; the plain ratio alone when ``n_boot <= 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    n = num.size
    if n == 0 or den.sum() <= 0:
        return None
    if n_boot <= 0:
        return np.array([num.sum() / den.sum()])
    pairs, inverse = np.unique(np.stack([num, den], axis=1), axis=0, return_inverse=True)
    if len(pairs) <= _FEW_DISTINCT:
        # Few distinct (num, den) rows (rates: 0/1 of 1; per-background hits of a few draws):
        # resampling n rows with replacement draws the counts of each distinct row from a
        # multinomial, the same distribution at O(distinct) per resample instead of O(n).
        freq = np.bincount(np.ravel(inverse), minlength=len(pairs)) / n
        counts = rng.multinomial(n, freq, size=n_boot).astype(np.float64)
        d = counts @ pairs[:, 1]
        return np.where(d > 0, (counts @ pairs[:, 0]) / np.maximum(d, 1e-12), np.nan)
    stats = np.empty(n_boot)
    step = max(1, 4_000_000 // n)  # bounded memory for many rows
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        pick = rng.integers(0, n, (k, n))
        d = den[pick].sum(axis=1)
        stats[s:s + k] = np.where(d > 0, num[pick].sum(axis=1) / np.maximum(d, 1e-12), np.nan)
    return stats


def interval(stats) -> list | None:
    """The 95% percentile interval of a bootstrap distribution (None when there is none)."""
    if stats is None or not np.isfinite(stats).any():
        return None
    lo, hi = np.nanquantile(stats, [0.025, 0.975])
    return [float(lo), float(hi)]
