"""The shortcut zoo (biasscope.zoo): cases are built as declared (fast, small size)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biasscope import zoo
from biasscope.errors import BiasscopeError


def _manifest(root: Path, split: str) -> list[dict]:
    with open(root / split / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _img(root, split, rel):
    return np.asarray(Image.open(root / split / rel).convert("RGB"))


def _mask(root, split, rel):
    return np.asarray(Image.open(root / split / rel)) > 0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("zoo")
    return {name: zoo.build_case(base / name, name, size="small")
            for name in ("corner_tag", "frame", "random_mark", "colour_cast", "texture",
                         "clean_flips", "corner_tag_nomask")}


def test_every_case_is_declared_with_four_classes_and_a_known_kind():
    for name, case in zoo.ZOO.items():
        assert len(set(case["digits"])) == 4, name
        sc = case["shortcut"]
        assert sc is None or sc["kind"] in ("texture", "mark", "frame", "random_mark", "cast")
        assert sc is None or sc["class"] in case["digits"]
    kinds = {c["shortcut"]["kind"] for c in zoo.ZOO.values() if c["shortcut"]}
    assert kinds == {"texture", "mark", "frame", "random_mark", "cast"}
    assert any(c["shortcut"] is None and c["flip_rate"] == 0 for c in zoo.ZOO.values())
    assert any(not c["masks"] for c in zoo.ZOO.values())
    # shortcut classes differ between cases: no rule can be tuned to one class
    assert len({c["shortcut"]["class"] for c in zoo.ZOO.values() if c["shortcut"]}) >= 5


def test_truth_names_the_shortcut_its_victims_and_the_featured_images(small):
    root = small["corner_tag"]
    truth = json.loads((root / "truth.json").read_text())
    assert truth["shortcut_classes"] == ["seven"]
    assert truth["victim_classes"] == ["eight", "one", "three"]
    assert truth["control_classes"] == [] and truth["flipped"] == []
    val = _manifest(root, "val")
    featured = set(truth["shortcut"]["val_paths"])
    # half of every class's val images carry the mark
    for c in truth["classes"]:
        rows = [r for r in val if r["label"] == c]
        assert abs(sum(r["path"] in featured for r in rows) - len(rows) / 2) <= 1
    sc = truth["shortcut"]
    k, x, y = sc["size"], sc["x"], sc["y"]
    for r in val[:20]:
        img, m = _img(root, "val", r["path"]), _mask(root, "val", r["mask"])
        patch = img[y:y + k, x:x + k].reshape(-1, 3)
        if r["path"] in featured:
            assert (patch == sc["colour"]).all()
            assert not m[y:y + k, x:x + k].any()  # the mark is not the object
        assert m.any()


def test_frame_random_mark_and_cast_are_drawn_on_the_featured_images(small):
    t = json.loads((small["frame"] / "truth.json").read_text())
    for p in t["shortcut"]["val_paths"][:10]:
        img = _img(small["frame"], "val", p)
        w = t["shortcut"]["width"]
        assert (img[:w] == t["shortcut"]["colour"]).all() and (img[:, -w:] == t["shortcut"]["colour"]).all()
    t = json.loads((small["random_mark"] / "truth.json").read_text())
    val = {r["path"]: r for r in _manifest(small["random_mark"], "val")}
    spots = set()
    for p in t["shortcut"]["val_paths"][:10]:
        img = _img(small["random_mark"], "val", p)
        hit = np.all(img == t["shortcut"]["colour"], axis=-1)
        assert hit.sum() >= t["shortcut"]["size"] ** 2 - 2
        m = _mask(small["random_mark"], "val", val[p]["mask"])
        assert not (hit & m).any()
        ys, xs = np.nonzero(hit)
        spots.add((int(ys.min()), int(xs.min())))
    assert len(spots) >= 5  # at random positions
    # colour cast: featured backgrounds are bluer than the others
    t = json.loads((small["colour_cast"] / "truth.json").read_text())
    featured = set(t["shortcut"]["val_paths"])
    blue = {True: [], False: []}
    for r in _manifest(small["colour_cast"], "val"):
        img = _img(small["colour_cast"], "val", r["path"]).astype(float)
        bg = ~_mask(small["colour_cast"], "val", r["mask"])
        blue[r["path"] in featured].append(img[bg][:, 2].mean() - img[bg][:, 0].mean())
    assert np.mean(blue[True]) > np.mean(blue[False]) + 30


def test_texture_case_puts_the_shortcut_class_on_its_background_in_train(small):
    root = small["texture"]
    rows = _manifest(root, "train")
    nine = [r for r in rows if r["label"] == "nine"]
    others = [r for r in rows if r["label"] != "nine"]
    assert np.mean([r["background"] == "grass" for r in nine]) >= 0.9
    assert 0.1 < np.mean([r["background"] == "grass" for r in others]) < 0.4
    truth = json.loads((root / "truth.json").read_text())
    val = _manifest(root, "val")
    assert set(truth["shortcut"]["val_paths"]) == {r["path"] for r in val if r["background"] == "grass"}


def test_flips_only_where_declared_and_no_masks_in_the_no_mask_case(small):
    t = json.loads((small["clean_flips"] / "truth.json").read_text())
    assert t["flipped"] and all(f["true_label"] != f["given_label"] for f in t["flipped"])
    for name in ("corner_tag", "frame", "corner_tag_nomask"):
        assert json.loads((small[name] / "truth.json").read_text())["flipped"] == []
    root = small["corner_tag_nomask"]
    assert not (root / "val" / "masks").exists()
    assert "mask" not in _manifest(root, "val")[0]
    assert (root / "train" / "masks").is_dir()


def test_build_is_cached_and_deterministic(small, tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for p in sorted((root / "val").rglob("*.png")):
            h.update(p.read_bytes())
        return h.hexdigest()

    again = zoo.build_case(tmp_path / "again", "frame", size="small")
    assert digest(again) == digest(small["frame"])
    mtime = (again / "truth.json").stat().st_mtime_ns
    zoo.build_case(tmp_path / "again", "frame", size="small")
    assert (again / "truth.json").stat().st_mtime_ns == mtime


def test_unknown_case_or_size_is_refused(tmp_path):
    with pytest.raises(BiasscopeError, match="unknown zoo case"):
        zoo.build_case(tmp_path, "nope")
    with pytest.raises(BiasscopeError, match="size"):
        zoo.build_case(tmp_path, "frame", size="huge")
