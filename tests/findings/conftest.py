"""Builders for hand-made scan tables and heatmaps shared by the detector tests.

A table is built from per-image arrays only (no model, no TensorFlow): labels, predictions,
class probabilities and, optionally, attention metrics and attributes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def blob(hw: int, cy: float, cx: float, sigma: float = 0.8) -> np.ndarray:
    yy, xx = np.mgrid[:hw, :hw]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma * sigma)).astype(np.float32)


def table_from(classes, label, pred=None, *, probs=None, confidence=None, inside=None,
               mask_frac=None, **attributes) -> pd.DataFrame:
    """A scan table. ``label``/``pred`` are class positions; ``probs`` (N, K) full class
    probabilities (default: 0.8 on the prediction, the rest spread evenly)."""
    label = np.asarray(label)
    n, K = len(label), len(classes)
    if probs is None:
        pred = label.copy() if pred is None else np.asarray(pred)
        conf = np.full(n, 0.8) if confidence is None else np.asarray(confidence, float)
        probs = np.tile(((1 - conf) / max(K - 1, 1))[:, None], (1, K))
        probs[np.arange(n), pred] = conf
    probs = np.asarray(probs, float)
    if pred is None:
        pred = probs.argmax(axis=1)
    pred = np.asarray(pred)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    names = np.array(classes)
    inside = np.full(n, np.nan) if inside is None else np.asarray(inside, float)
    mf = np.full(n, 0.25) if mask_frac is None else np.asarray(mask_frac, float)
    mf = np.where(np.isfinite(inside), mf, np.nan)
    t = pd.DataFrame({
        "index": np.arange(n), "path": [f"{names[l]}/img_{i:04d}.png" for i, l in enumerate(label)],
        "label": names[label], "label_idx": label.astype(np.int32), "pred": names[pred],
        "pred_idx": pred.astype(np.int32), "correct": label == pred,
        "confidence": probs[np.arange(n), pred], "label_prob": probs[np.arange(n), label],
        "top5": list(order.astype(np.int32)),
        "top5_prob": list(np.take_along_axis(probs, order, axis=1).astype(np.float32)),
        "inside_frac": inside, "mask_frac": mf, "lift": inside / mf,
        "pointing_hit": np.where(np.isfinite(inside), (inside > 0.5).astype(float), np.nan),
        "energy_inside": inside, "cam_entropy": np.full(n, 0.5),
    })
    for k, v in attributes.items():
        t[k] = v
    t["cluster"] = pd.array([pd.NA] * n, dtype="Int32")
    t["embed_x"] = np.nan
    t["embed_y"] = np.nan
    t["flags"] = [[] for _ in range(n)]
    return t


def planted_scan(seed: int = 0, *, n_obj: int = 60, n_corner: int = 40, masks: bool = True):
    """Class 'a': n_obj object-centred CAMs at varying positions (attention on the object) and
    n_corner CAMs on a fixed top-left blob (attention off the object); classes 'b' and 'c':
    object-centred only. Returns (table, heatmaps, corner_rows)."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    hw = 7
    maps, label, inside = [], [], []
    for ci, n in ((0, n_obj + n_corner), (1, 50), (2, 50)):
        for i in range(n):
            corner = ci == 0 and i >= n_obj
            if corner:
                m = blob(hw, 0.3, 0.3, 0.7)
                inside.append(rng.uniform(0.02, 0.2))
            else:
                m = blob(hw, *rng.uniform(2, 5, 2), 1.0)
                inside.append(rng.uniform(0.6, 0.95))
            maps.append(m + rng.uniform(0, 0.03, (hw, hw)).astype(np.float32))
            label.append(ci)
    label = np.array(label)
    inside = np.array(inside) if masks else None
    t = table_from(classes, label, label, confidence=np.full(len(label), 0.9), inside=inside)
    corner_rows = np.arange(n_obj, n_obj + n_corner)
    return t, np.stack(maps).astype(np.float16), corner_rows


@pytest.fixture
def make_table():
    return table_from


@pytest.fixture
def make_planted():
    return planted_scan


@pytest.fixture
def make_blob():
    return blob
