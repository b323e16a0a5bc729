"""Tests for biasscope.metrics: known answers, Quantus agreement, properties, validation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from biasscope.errors import BiasscopeError
from biasscope.metrics import (
    COLUMNS,
    attention_metrics,
    cam_entropy,
    energy_inside,
    inside_frac,
    lift,
    mask_frac,
    pointing_hit,
    upsample_bilinear,
)

# ----------------------------------------------------------------------------------------------
# Data helpers
# ----------------------------------------------------------------------------------------------


def _tie_free(rng, n, H, W):
    """Heatmaps whose pixel values are all distinct within each row (checked)."""
    h = rng.random((n, H, W)) + 0.01
    for row in h.reshape(n, -1):
        assert np.unique(row).size == row.size
    return h


def _random_masks(rng, n, H, W):
    """Non-empty masks: a random rectangle plus random scattered pixels, varying coverage."""
    m = rng.random((n, H, W)) < rng.uniform(0.02, 0.5, size=(n, 1, 1))
    for i in range(n):
        y, x = rng.integers(0, H // 2), rng.integers(0, W // 2)
        m[i, y : y + rng.integers(1, H // 2), x : x + rng.integers(1, W // 2)] = True
    return m


def _realistic(rng, n=6, hw=(5, 5), size=(20, 20)):
    """ReLU'd CAMs upsampled like the scan does: many exact zeros, hence ties."""
    cams = np.maximum(rng.normal(size=(n, *hw)), 0.0)
    h = upsample_bilinear(cams, size).astype(np.float64)
    return h, _random_masks(rng, n, *size)


def _with_degenerate_rows(h, m):
    """Append a row with an empty mask and a row with an all-zero heatmap."""
    h = np.concatenate([h, h[:1], np.zeros_like(h[:1])])
    m = np.concatenate([m, np.zeros_like(m[:1]), m[:1]])
    return h, m


# ----------------------------------------------------------------------------------------------
# upsample_bilinear
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src, dst",
    [((7, 7), (224, 224)), ((7, 5), (13, 31)), ((10, 10), (3, 4)), ((1, 1), (5, 6)),
     ((6, 6), (7, 5)), ((3, 8), (1, 1)), ((14, 14), (14, 15))],
)
def test_upsample_matches_tf_image_resize(src, dst):
    tf = pytest.importorskip("tensorflow")
    x = np.random.default_rng(0).random((3, *src)).astype(np.float32)
    ref = tf.image.resize(x[..., None], dst, method="bilinear", antialias=False).numpy()[..., 0]
    out = upsample_bilinear(x, dst)
    assert out.dtype == np.float32 and out.shape == (3, *dst)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_upsample_same_size_returns_float32_copy():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = upsample_bilinear(x, (3, 4))
    assert out.dtype == np.float32 and not np.shares_memory(out, x)
    np.testing.assert_array_equal(out, x)
    out = upsample_bilinear(x.astype(np.int64), (3, 4))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_upsample_known_values():
    # 1-d ramp 0, 1 upsampled x2 with half-pixel centres: 0, .25, .75, 1 (edges clamp).
    out = upsample_bilinear([[[0.0, 1.0]]], (1, 4))
    np.testing.assert_allclose(out[0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Agreement with Quantus
# ----------------------------------------------------------------------------------------------


def _quantus(name, h, m, **options):
    """Scores from Quantus' own metric class, on precomputed attributions (no model needed)."""
    quantus = pytest.importorskip("quantus")
    metric = getattr(quantus, name)(disable_warnings=True, **options)
    x = h[:, None].astype(np.float64)  # (n, 1, H, W), channel first
    scores = metric(
        model=None, x_batch=x, y_batch=np.zeros(len(h), dtype=int), a_batch=x.copy(),
        s_batch=m[:, None].astype(np.float64), channel_first=True,
    )
    return np.asarray(scores, dtype=np.float64)


OURS_VS_QUANTUS = {
    "RelevanceMassAccuracy": inside_frac,
    "RelevanceRankAccuracy": energy_inside,
    "PointingGame": pointing_hit,
}


# Quantus defaults to abs=False, normalise=True (divide by the max |a|); none of the three
# metrics is sensitive to that positive rescaling, so both settings must agree with ours.
@pytest.mark.parametrize("normalise", [False, True], ids=["raw", "quantus-default-normalise"])
@pytest.mark.parametrize("name", sorted(OURS_VS_QUANTUS))
def test_agrees_with_quantus_on_tie_free_data(name, normalise):
    rng = np.random.default_rng(42)
    h = _tie_free(rng, 12, 24, 20)
    m = _random_masks(rng, 12, 24, 20)
    # make sure both outcomes of the pointing game occur
    flat = h.reshape(12, -1)
    m.reshape(12, -1)[np.arange(12), flat.argmax(1)] = np.arange(12) % 2 == 0
    expected = _quantus(name, h, m, abs=False, normalise=normalise)
    ours = OURS_VS_QUANTUS[name](h, m)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    if name == "PointingGame":
        assert set(ours) == {0.0, 1.0}


def test_inside_frac_agrees_with_quantus_on_realistic_cams_with_ties():
    # RMA has no ranking, so ties (exact zeros after ReLU) cannot make it disagree.
    h, m = _realistic(np.random.default_rng(1), n=8)
    expected = _quantus("RelevanceMassAccuracy", h, m, abs=False, normalise=False)
    np.testing.assert_allclose(inside_frac(h, m), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Hand-built cases with known answers
# ----------------------------------------------------------------------------------------------


def _box_mask(H=8, W=8):
    m = np.zeros((1, H, W), bool)
    m[0, 2:5, 1:5] = True  # 12 of 64 pixels
    return m


def test_cam_entirely_inside_mask():
    m = _box_mask()
    h = np.zeros(m.shape)
    h[0, 2:5, 1:5] = np.arange(1, 13).reshape(3, 4)  # fills the mask, distinct values
    assert mask_frac(m)[0] == pytest.approx(12 / 64)
    assert inside_frac(h, m)[0] == pytest.approx(1.0, abs=1e-12)
    assert lift(h, m)[0] == pytest.approx(64 / 12)
    assert pointing_hit(h, m)[0] == 1.0
    assert energy_inside(h, m)[0] == pytest.approx(1.0)


def test_cam_entirely_outside_mask():
    m = _box_mask()
    h = np.zeros(m.shape)
    h[0, 6:, :] = np.arange(1, 17).reshape(2, 8)  # 16 pixels, none in the mask
    assert inside_frac(h, m)[0] == 0.0
    assert lift(h, m)[0] == 0.0
    assert pointing_hit(h, m)[0] == 0.0
    assert energy_inside(h, m)[0] == 0.0


def test_uniform_cam_is_chance_level():
    m = _box_mask()
    h = np.full(m.shape, 0.3)
    assert inside_frac(h, m)[0] == pytest.approx(mask_frac(m)[0])
    assert lift(h, m)[0] == pytest.approx(1.0)
    assert cam_entropy(h)[0] == pytest.approx(1.0)
    # every pixel ties: the rank accuracy is the expected value, i.e. chance level
    assert energy_inside(h, m)[0] == pytest.approx(12 / 64)
    # all 64 maxima must be inside the mask for a hit; 52 are not
    assert pointing_hit(h, m)[0] == 0.0


def test_entropy_known_values():
    h = np.zeros((3, 4, 4))
    h[0, 1, 2] = 5.0  # delta
    h[1, 0, 0] = h[1, 3, 3] = 2.0  # two equal pixels: log 2 / log 16 = 1/4
    h[2] = np.arange(16.0).reshape(4, 4)
    p = h[2].ravel() / h[2].sum()
    p = p[p > 0]
    expected = [0.0, 0.25, -(p * np.log(p)).sum() / np.log(16)]
    np.testing.assert_allclose(cam_entropy(h), expected, atol=1e-12)


def test_lift_is_inside_frac_over_mask_frac():
    h, m = _realistic(np.random.default_rng(3))
    np.testing.assert_allclose(lift(h, m), inside_frac(h, m) / mask_frac(m), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Edge cases and tie rules
# ----------------------------------------------------------------------------------------------

MASK_BASED = ["inside_frac", "lift", "pointing_hit", "energy_inside"]


def test_empty_mask_gives_nan_in_mask_based_metrics():
    h = np.random.default_rng(0).random((2, 6, 6))
    m = np.zeros((2, 6, 6), bool)
    m[1, :3] = True
    for f in (inside_frac, lift, pointing_hit, energy_inside):
        out = f(h, m)
        assert np.isnan(out[0]) and np.isfinite(out[1]), f.__name__
    assert mask_frac(m)[0] == 0.0
    assert np.isfinite(cam_entropy(h)).all()


def test_all_zero_heatmap():
    h = np.zeros((1, 6, 6))
    m = np.zeros((1, 6, 6), bool)
    m[0, :2] = True
    assert np.isnan(inside_frac(h, m)[0])
    assert np.isnan(lift(h, m)[0])
    assert np.isnan(pointing_hit(h, m)[0])
    assert np.isnan(cam_entropy(h)[0])
    # all pixels tie at 0: expected rank accuracy under random tie-breaking = chance level
    assert energy_inside(h, m)[0] == pytest.approx(12 / 36)


def test_pointing_game_ties_require_all_maxima_inside():
    m = np.zeros((3, 4, 4), bool)
    m[:, :2, :] = True
    h = np.zeros((3, 4, 4))
    h[0, 0, 0] = h[0, 3, 3] = 1.0  # one max inside, one outside -> miss
    h[1, 0, 0] = h[1, 1, 3] = 1.0  # both maxima inside -> hit
    h[2, 3, 0] = h[2, 0, 1] = 1.0  # order swapped: outside first in raster order -> miss
    h[:, 2, 2] = 0.5
    np.testing.assert_array_equal(pointing_hit(h, m), [0.0, 1.0, 0.0])


def test_energy_inside_tie_rule_shares_tied_places_in_proportion():
    h = np.zeros((1, 4, 4))
    h[0, 0, 0] = 2.0  # inside the mask
    h[0, 3, 3] = 1.0  # outside
    m = np.zeros((1, 4, 4), bool)
    m[0, 0, :] = True  # K = 4: two strictly positive pixels + 2 of the 14 zeros
    # one positive pixel inside; the 2 remaining places go to 14 tied zeros, 3 of them inside
    expected = (1 + 2 * 3 / 14) / 4
    assert energy_inside(h, m)[0] == pytest.approx(expected)


def test_energy_inside_ties_equal_expectation_over_random_tie_breaking():
    rng = np.random.default_rng(7)
    h, m = _realistic(rng, n=4, hw=(4, 4), size=(12, 12))
    h = np.round(h, 1)  # many ties at several levels, not only at zero
    n, P = len(h), h[0].size
    # Break ties uniformly at random (argsort of -h, then a random permutation as key), many
    # times, with the RRA definition; the mean converges to our proportional rule.
    hf, mf, k = h.reshape(n, -1), m.reshape(n, -1), m.reshape(n, -1).sum(1)
    draws = 4000
    total = np.zeros(n)
    for _ in range(draws):
        key = rng.random((n, P))
        order = np.lexsort((key, -hf), axis=-1)
        hits = np.take_along_axis(mf, order, axis=1) & (np.arange(P) < k[:, None])
        total += hits.sum(1) / k
    np.testing.assert_allclose(energy_inside(h, m), total / draws, atol=0.01)


def test_tie_rules_do_not_depend_on_pixel_order():
    # A pixel-order tie-break (stable sort, first pixels win) would change under a flip.
    h, m = _realistic(np.random.default_rng(5), n=8)
    for f in (energy_inside, pointing_hit, inside_frac):
        base = f(h, m)
        for flip in ((1,), (2,), (1, 2)):
            np.testing.assert_allclose(f(np.flip(h, flip), np.flip(m, flip)), base, rtol=1e-12,
                                       err_msg=f.__name__)


def test_mask_valid_false_rows_are_nan():
    rng = np.random.default_rng(2)
    cams = np.maximum(rng.normal(size=(4, 5, 5)), 0) + 0.01
    masks = _random_masks(rng, 4, 20, 20)
    valid = np.array([True, False, True, False])
    full = attention_metrics(cams, masks)
    part = attention_metrics(cams, masks, mask_valid=valid)
    for name in COLUMNS:
        if name == "cam_entropy":
            np.testing.assert_array_equal(part[name], full[name])
            assert np.isfinite(part[name]).all()
        else:
            assert np.isnan(part[name][~valid]).all(), name
            np.testing.assert_array_equal(part[name][valid], full[name][valid])
            assert np.isfinite(part[name][valid]).all(), name


def test_masks_none_gives_entropy_at_cam_resolution_and_nan_elsewhere():
    cams = np.maximum(np.random.default_rng(3).normal(size=(3, 7, 7)), 0)
    cams[:, 0, 0] += 1.0
    out = attention_metrics(cams)
    assert list(out) == list(COLUMNS)
    np.testing.assert_array_equal(out["cam_entropy"], cam_entropy(cams))
    assert np.isfinite(out["cam_entropy"]).all()
    for name in COLUMNS:
        if name != "cam_entropy":
            assert np.isnan(out[name]).all(), name


def test_attention_metrics_equals_standalone_functions_on_upsampled_cams():
    rng = np.random.default_rng(4)
    cams = np.maximum(rng.normal(size=(5, 7, 7)), 0).astype(np.float32)
    cams[4] = 0.0  # all-zero row
    masks = _random_masks(rng, 5, 56, 48)
    masks[3] = False  # empty mask row
    out = attention_metrics(cams, masks)
    h = upsample_bilinear(cams, (56, 48))
    expected = {
        "inside_frac": inside_frac(h, masks), "mask_frac": mask_frac(masks),
        "lift": lift(h, masks), "pointing_hit": pointing_hit(h, masks),
        "energy_inside": energy_inside(h, masks), "cam_entropy": cam_entropy(h),
    }
    assert list(out) == list(COLUMNS)
    for name in COLUMNS:
        assert out[name].dtype == np.float64 and out[name].shape == (5,)
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-12, err_msg=name)
    assert np.isnan(out["inside_frac"][3:]).all() and np.isfinite(out["inside_frac"][:3]).all()


def test_empty_batch():
    out = attention_metrics(np.zeros((0, 7, 7)), np.zeros((0, 14, 14), bool))
    assert all(v.shape == (0,) and v.dtype == np.float64 for v in out.values())
    assert inside_frac(np.zeros((0, 3, 3)), np.zeros((0, 3, 3))).shape == (0,)


# ----------------------------------------------------------------------------------------------
# Properties over the registry of metric functions (cf. scikit-learn's test_common)
# ----------------------------------------------------------------------------------------------

REGISTRY = {
    "inside_frac": inside_frac,
    "mask_frac": lambda h, m: mask_frac(m),
    "lift": lift,
    "pointing_hit": pointing_hit,
    "energy_inside": energy_inside,
    "cam_entropy": lambda h, m: cam_entropy(h),
}
UNIT_INTERVAL = ["inside_frac", "mask_frac", "pointing_hit", "energy_inside", "cam_entropy"]
SCALE_INVARIANT = ["inside_frac", "lift", "pointing_hit", "energy_inside", "cam_entropy"]


def test_registry_covers_every_column():
    assert set(REGISTRY) == set(COLUMNS)


@pytest.fixture(scope="module")
def property_data():
    rng = np.random.default_rng(11)
    h, m = _realistic(rng, n=7)
    h2 = _tie_free(rng, 3, 20, 20)
    m2 = _random_masks(rng, 3, 20, 20)
    return _with_degenerate_rows(np.concatenate([h, h2]), np.concatenate([m, m2]))


@pytest.mark.parametrize("name", UNIT_INTERVAL)
def test_bounds(name, property_data):
    out = REGISTRY[name](*property_data)
    assert out.dtype == np.float64 and out.shape == (len(property_data[0]),)
    finite = out[np.isfinite(out)]
    assert finite.size >= len(out) - 2
    assert (finite >= 0).all() and (finite <= 1).all()


@pytest.mark.parametrize("scale", [1e-3, 0.25, 3.7, 1e4])
@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_invariant_to_positive_scaling(name, scale, property_data):
    h, m = property_data
    np.testing.assert_allclose(REGISTRY[name](h * scale, m), REGISTRY[name](h, m), rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_batch_equals_row_by_row(name, property_data):
    h, m = property_data
    batch = REGISTRY[name](h, m)
    rows = np.concatenate([REGISTRY[name](h[i : i + 1], m[i : i + 1]) for i in range(len(h))])
    np.testing.assert_allclose(batch, rows, rtol=1e-12)


def test_attention_metrics_batch_equals_row_by_row():
    rng = np.random.default_rng(12)
    cams = np.maximum(rng.normal(size=(6, 7, 7)), 0)
    masks = _random_masks(rng, 6, 28, 28)
    valid = np.array([1, 1, 0, 1, 0, 1], bool)
    batch = attention_metrics(cams, masks, mask_valid=valid)
    for i in range(6):
        row = attention_metrics(cams[i : i + 1], masks[i : i + 1], mask_valid=valid[i : i + 1])
        for name in COLUMNS:
            np.testing.assert_allclose(batch[name][i], row[name][0], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_accepts_lists_and_integer_masks(name):
    h, m = _realistic(np.random.default_rng(9), n=2, size=(6, 6))
    expected = REGISTRY[name](h, m)
    np.testing.assert_array_equal(REGISTRY[name](h.tolist(), m.astype(np.uint8).tolist()),
                                  expected)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

H3 = np.ones((3, 7, 7))
M3 = np.ones((3, 7, 7), bool)


@pytest.mark.parametrize("f", [inside_frac, lift, pointing_hit, energy_inside])
@pytest.mark.parametrize(
    "h, masks, message",
    [
        (np.ones((7, 7)), np.ones((7, 7), bool), "h must have shape (n, H, W) (3 dimensions), "
                                                 "got h of shape (7, 7)"),
        (H3, np.ones((3, 224), bool),
         "masks must have shape (n, H, W) matching h: h is (3, 7, 7), masks is (3, 224)"),
        (H3, np.ones((3, 224, 224), bool),
         "masks must have shape (n, H, W) matching h: h is (3, 7, 7), masks is (3, 224, 224)"),
        (H3, np.ones((2, 7, 7), bool),
         "masks must have shape (n, H, W) matching h: h is (3, 7, 7), masks is (2, 7, 7)"),
        (-H3, M3, "h must be non-negative (a CAM after ReLU); h of shape (3, 7, 7)"),
        (np.where(np.eye(7, dtype=bool), np.nan, H3), M3, "h of shape (3, 7, 7) contains NaN"),
        (H3, np.full((3, 7, 7), 0.5), "masks must be binary (bool or 0/1); masks of shape "
                                      "(3, 7, 7)"),
        (np.full((3, 7, 7), "a"), M3, "h must be numeric"),
    ],
)
def test_metric_validation(f, h, masks, message):
    with pytest.raises(BiasscopeError, match=re.escape(message)):
        f(h, masks)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        inside_frac(np.ones((7, 7)), np.ones((7, 7)))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: cam_entropy(np.ones((2, 3))), "h must have shape (n, H, W) (3 dimensions), "
                                               "got h of shape (2, 3)"),
        (lambda: cam_entropy(-np.ones((1, 2, 2))), "h must be non-negative"),
        (lambda: mask_frac(np.ones((4, 4))), "masks must have shape (n, H, W) (3 dimensions), "
                                             "got masks of shape (4, 4)"),
        (lambda: upsample_bilinear(np.ones((7, 7)), (14, 14)),
         "cams must have shape (n, h, w) (3 dimensions), got cams of shape (7, 7)"),
        (lambda: upsample_bilinear(np.ones((1, 7, 7)), (0, 14)), "size must be a pair (H, W)"),
        (lambda: upsample_bilinear(np.ones((1, 7, 7)), (14,)), "size must be a pair (H, W)"),
        (lambda: upsample_bilinear(np.ones((1, 7, 7)), (14.5, 14)), "size must be a pair"),
        (lambda: attention_metrics(np.ones((3, 7, 7)), np.ones((2, 224, 224), bool)),
         "masks must have shape (n, H, W) with the same n as cams: cams is (3, 7, 7), "
         "masks is (2, 224, 224)"),
        (lambda: attention_metrics(np.ones((3, 7, 7)), np.ones((3, 224), bool)),
         "cams is (3, 7, 7), masks is (3, 224)"),
        (lambda: attention_metrics(np.ones((3, 7)), None),
         "cams must have shape (n, h, w) (3 dimensions), got cams of shape (3, 7)"),
        (lambda: attention_metrics(-np.ones((3, 7, 7)), np.ones((3, 14, 14), bool)),
         "cams must be non-negative (a CAM after ReLU); cams of shape (3, 7, 7)"),
        (lambda: attention_metrics(np.ones((3, 7, 7)), np.ones((3, 14, 14), bool),
                                   mask_valid=[True, False]),
         "mask_valid must have shape (n,) matching cams: cams has n=3, mask_valid is (2,)"),
        (lambda: attention_metrics(np.ones((3, 7, 7)), np.full((3, 14, 14), 2)),
         "masks must be binary"),
    ],
)
def test_other_validation(call, message):
    with pytest.raises(BiasscopeError, match=re.escape(message)):
        call()


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        attention_metrics(np.ones((1, 2, 2)), np.ones((1, 4, 4), bool), np.ones(1, bool))
