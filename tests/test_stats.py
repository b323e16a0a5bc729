"""biasscope.stats: the bootstrap of a ratio of sums, resampling rows."""

import numpy as np
import pytest

from biasscope import stats
from biasscope.stats import boot_ratio, interval


@pytest.mark.parametrize("kind", ["rate", "hits_of_draws"])
def test_multinomial_counts_resample_like_rows(kind, monkeypatch):
    """Few distinct rows: the counts of each are drawn from a multinomial. The distribution must
    be the one of resampling the rows themselves (the general path, forced here)."""
    rng = np.random.default_rng(0)
    n = 400
    if kind == "rate":
        num, den = (rng.random(n) < 0.3).astype(float), np.ones(n)
    else:  # per background: hits among 1..4 draws
        den = rng.integers(1, 5, n).astype(float)
        num = rng.binomial(den.astype(int), 0.4).astype(float)
    fast = boot_ratio(num, den, 4000, np.random.default_rng(1))
    monkeypatch.setattr(stats, "_FEW_DISTINCT", 0)
    rows = boot_ratio(num, den, 4000, np.random.default_rng(1))
    for b in (fast, rows):
        assert np.mean(b) == pytest.approx(num.sum() / den.sum(), abs=0.003)
    assert np.std(fast) == pytest.approx(np.std(rows), rel=0.06)
    np.testing.assert_allclose(interval(fast), interval(rows), atol=0.01)
    if kind == "rate":  # and the binomial's own spread
        p = num.mean()
        assert np.std(fast) == pytest.approx(np.sqrt(p * (1 - p) / n), rel=0.06)


def test_edge_cases():
    rng = np.random.default_rng(0)
    assert boot_ratio([], [], 100, rng) is None
    assert boot_ratio([1, 0], [0, 0], 100, rng) is None
    np.testing.assert_allclose(boot_ratio([1, 0, 1], [1, 1, 1], 0, rng), [2 / 3])
    b = boot_ratio([1, 1], [1, 1], 50, rng)
    assert b.shape == (50,) and np.all(b == 1.0)
