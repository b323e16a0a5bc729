"""The per-batch kernel of the CAM pass: one batch (images, labels, masks) -> table rows and
heatmaps. Every engine calls it on its CAM engine's output, so that the stored result does not
depend on which one ran.

numpy only: the attention metrics of the predicted and
labelled classes' maps, the predictions, and each map scaled to a peak of 1 (float16 cannot hold
the tiny CAMs some models produce; every metric is scale-invariant and the peak is kept in the
table).
"""

from __future__ import annotations

import numpy as np

from .metrics import attention_metrics, inside_frac, lift, upsample_bilinear


def batch_rows(res: dict, index: np.ndarray, masks: np.ndarray, has_mask: np.ndarray,
               label_idx: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray]:
    """(columns, unit-peak predicted-class maps, unit-peak labelled-class maps) of one batch.

    ``res`` is a CAM engine's output for the padded batch; ``index`` (B,) the dataset rows, -1
    for padding; ``masks`` (B, H, W) and ``has_mask`` (B,) the batch's masks; ``label_idx`` the
    labelled class of each valid row, in order.
    """
    valid = index >= 0
    masks_b, has_b = masks[valid], has_mask[valid]
    att = attention_metrics(res["cam_pred"][valid], masks_b, mask_valid=has_b)
    pred = res["pred_idx"][valid].astype(np.int32)
    att.update(_label_attention(res["cam_true"][valid], masks_b, has_b, pred != label_idx, att))
    cols = {
        "index": index[valid], "pred_idx": pred,
        "correct": pred == label_idx,
        "confidence": res["confidence"][valid].astype(np.float64),
        "label_prob": res["label_prob"][valid].astype(np.float64),
        "top5": res["top_idx"][valid].astype(np.int32),
        "top5_prob": res["top_prob"][valid].astype(np.float32),
        **{k: np.asarray(v, dtype=np.float64) for k, v in att.items()},
    }
    cam_p, cols["cam_max"] = unit_peak(res["cam_pred"][valid])
    cam_t, cols["cam_true_max"] = unit_peak(res["cam_true"][valid])
    return cols, cam_p, cam_t


def _label_attention(cam_true, masks, has_mask, wrong, att) -> dict:
    """inside_frac and lift of the labelled class's CAM (evidence for label issues).

    Where the prediction is right the two CAMs are the same, so only wrong rows are computed.
    """
    out = {"inside_frac_true": att["inside_frac"].copy(), "lift_true": att["lift"].copy()}
    rows = np.flatnonzero(wrong & has_mask)
    if len(rows):
        h = upsample_bilinear(cam_true[rows], masks.shape[1:])
        out["inside_frac_true"][rows] = inside_frac(h, masks[rows])
        out["lift_true"][rows] = lift(h, masks[rows])
    return out


def unit_peak(cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each map divided by its peak (all-zero maps unchanged) and the peaks."""
    peak = cams.max(axis=(1, 2)).astype(np.float64)
    scale = np.where(peak > 0, peak, 1.0)
    return cams / scale[:, None, None].astype(cams.dtype), peak
