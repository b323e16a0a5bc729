"""Finding images, masks, manifests and class maps (no TensorFlow needed)."""

import json

import numpy as np
import pandas as pd
import pytest

from biasscope.data import load_dataset
from biasscope.errors import BiasscopeError
from conftest import CLASSES, make_image_set


def test_class_folders_with_parallel_masks(image_set):
    ds = load_dataset(image_set, n_outputs=3)
    assert ds.classes == sorted(CLASSES)
    assert len(ds) == 18
    t = ds.table
    assert (t["label_idx"] == t["label"].map({c: i for i, c in enumerate(sorted(CLASSES))})).all()
    assert all(m.endswith(p.replace("images/", "masks/")) for m, p in zip(t["mask_file"], t["path"]))


def test_images_folder_itself_with_masks_option(image_set):
    ds = load_dataset(image_set / "images", masks=image_set / "masks", n_outputs=3)
    assert len(ds) == 18 and (ds.table["mask_file"] != "").all()
    no_masks = load_dataset(image_set / "images", n_outputs=3)
    assert (no_masks.table["mask_file"] == "").all()


def test_manifest_with_boxes_and_attributes(image_set):
    rows = [{"path": f"images/circle/circle_00{i}.png", "label": "circle", "x0": 1, "y0": 2, "x1": 10,
             "y1": 12, "site": "A" if i % 2 else "B"} for i in range(4)]
    pd.DataFrame(rows).to_csv(image_set / "manifest.csv", index=False)
    ds = load_dataset(image_set, class_map={"circle": 0, "square": 1, "stripe": 2}, n_outputs=3)
    assert len(ds) == 4
    assert ds.attributes == ["site"]
    assert ds.table[["x0", "y0", "x1", "y1"]].iloc[0].tolist() == [1, 2, 10, 12]
    assert ds.table["site"].tolist() == ["B", "A", "B", "A"]


def test_class_mismatch_without_map_is_a_clear_error(image_set):
    with pytest.raises(BiasscopeError, match="3 classes .* but the model has 1000 outputs; pass --class-map"):
        load_dataset(image_set, n_outputs=1000)


def test_class_map_file(image_set, tmp_path):
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"circle": 7, "square": 3, "stripe": 999}))
    ds = load_dataset(image_set, class_map=cmap, n_outputs=1000)
    assert sorted(ds.table["label_idx"].unique()) == [3, 7, 999]
    cmap.write_text(json.dumps({"circle": 7, "square": 3}))
    with pytest.raises(BiasscopeError, match="no entry for class.*stripe"):
        load_dataset(image_set, class_map=cmap, n_outputs=1000)
    cmap.write_text(json.dumps({"circle": 7, "square": 3, "stripe": 1000}))
    with pytest.raises(BiasscopeError, match="output 1000, but the model has 1000 outputs"):
        load_dataset(image_set, class_map=cmap, n_outputs=1000)


def test_empty_dataset(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(BiasscopeError, match="no images found"):
        load_dataset(tmp_path)


def test_missing_mask_file_gives_null_mask_and_is_counted(image_set):
    (image_set / "masks" / "square" / "square_002.png").unlink()
    ds = load_dataset(image_set, n_outputs=3)
    assert ds.missing_masks == ["images/square/square_002.png"]
    assert ds.table.loc[ds.table["path"] == "images/square/square_002.png", "mask_file"].item() == ""


def test_limit_keeps_every_class(tmp_path):
    root = make_image_set(tmp_path / "d", n_per_class=10)
    ds = load_dataset(root, n_outputs=3, limit=6)
    assert len(ds) == 6 and ds.table["label"].value_counts().tolist() == [2, 2, 2]
    assert np.all(np.diff(ds.table.index) == 1)


def test_manifest_missing_columns(image_set):
    (image_set / "manifest.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(BiasscopeError, match="manifest.csv: missing column\\(s\\) path"):
        load_dataset(image_set)


def test_join_is_pathlibs_join():
    """The manifest's paths are joined as strings where that gives what pathlib gives: on
    clean, unclean (``.``, ``..``, empty parts, trailing slashes), relative and absolute paths
    under several roots, the same string."""
    import random
    from pathlib import Path

    from biasscope.data import _join

    parts = ["a", "b", "..", ".", "", "x y", "é", "c.png", "~"]
    rng = random.Random(0)
    for _ in range(5000):
        p = "/".join(rng.choice(parts) for _ in range(rng.randint(1, 4)))
        p = ("/" if rng.random() < 0.2 else "") + ("./" if rng.random() < 0.1 else "") + p
        if not p:
            continue
        for root in (".", "/", "/work/data", "rel/dir", "/a/b/"):
            r = str(Path(root))
            assert _join(r, p) == str(Path(r) / p), (r, p)
