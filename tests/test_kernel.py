"""The per-batch kernel: one engine output -> table rows and unit-peak heatmaps (numpy only)."""

import numpy as np

from biasscope.kernel import batch_rows, unit_peak
from biasscope.metrics import attention_metrics


def _res(rng, b=4, h=4, classes=3):
    cam_pred = rng.random((b, h, h)).astype(np.float32) * 0.01
    cam_true = rng.random((b, h, h)).astype(np.float32) * 0.01
    cam_pred[1] = 0  # an all-zero map stays zero and has peak 0
    return {"pred_idx": np.array([0, 1, 2, 0], np.int32), "confidence": np.full(b, 0.5, np.float32),
            "label_prob": np.full(b, 0.25, np.float32), "top_idx": np.tile(np.arange(classes), (b, 1)),
            "top_prob": np.full((b, classes), 1 / classes, np.float32), "cam_pred": cam_pred,
            "cam_true": cam_true}


def test_batch_rows_drops_padding_scales_maps_and_measures_the_labelled_map_where_wrong():
    rng = np.random.default_rng(0)
    res = _res(rng)
    index = np.array([7, 8, 9, -1])  # the last row pads the batch
    masks = np.zeros((4, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    has = np.array([True, True, True, False])
    labels = np.array([0, 2, 2])  # row 8 is wrong (predicted 1)
    cols, cam_p, cam_t = batch_rows(res, index, masks, has, labels)
    np.testing.assert_array_equal(cols["index"], [7, 8, 9])
    np.testing.assert_array_equal(cols["correct"], [True, False, True])
    assert cam_p.shape == (3, 4, 4) and cam_t.shape == (3, 4, 4)
    np.testing.assert_allclose(cam_p.max(axis=(1, 2)), [1, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(cols["cam_max"], res["cam_pred"][:3].max(axis=(1, 2)), rtol=1e-6)
    want = attention_metrics(res["cam_pred"][:3], masks[:3], mask_valid=has[:3])
    np.testing.assert_allclose(cols["inside_frac"], want["inside_frac"], equal_nan=True)
    # right rows reuse the predicted map's figures; the wrong row is measured on the label's map
    truth = attention_metrics(res["cam_true"][:3], masks[:3], mask_valid=has[:3])
    assert cols["inside_frac_true"][0] == cols["inside_frac"][0]
    assert cols["inside_frac_true"][1] == truth["inside_frac"][1] != cols["inside_frac"][1]


def test_unit_peak_keeps_zero_maps():
    maps = np.stack([np.full((2, 2), 4.0), np.zeros((2, 2))]).astype(np.float32)
    scaled, peak = unit_peak(maps)
    np.testing.assert_array_equal(peak, [4.0, 0.0])
    np.testing.assert_array_equal(scaled[0], 1.0)
    np.testing.assert_array_equal(scaled[1], 0.0)
