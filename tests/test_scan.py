"""End-to-end scans on tiny generated data: the stored result, bad input, resume after a kill."""

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import biasscope
from biasscope.errors import BiasscopeError
from biasscope.metrics import attention_metrics
from conftest import kill_once_stored, make_cnn, make_image_set

REQUIRED = ["path", "label", "label_idx", "pred", "pred_idx", "correct", "confidence", "label_prob",
            "top5", "inside_frac", "mask_frac", "lift", "pointing_hit", "energy_inside", "cam_entropy",
            "cluster", "embed_x", "embed_y", "flags"]


def test_scan_stores_the_result_of_section_4(image_set, cnn_path, tmp_path):
    out = tmp_path / "out"
    s = biasscope.scan(cnn_path, image_set, out=out, batch_size=4, progress=False)
    assert set(REQUIRED) <= set(s.table.columns)
    for name in ("meta.json", "scan.parquet", "heatmaps.npy", "heatmaps_true.npy"):
        assert (out / name).is_file()
    assert not (out / "chunks").exists()
    assert s.heatmaps.shape == (18, 8, 8) and s.heatmaps.dtype == np.float16
    meta = json.loads((out / "meta.json").read_text())
    assert meta["layer"] == "last_conv" and meta["status"] == "complete"
    assert len(meta["model"]["sha256"]) == 64 and meta["timings"]["traces"] == 1
    # stored predictions are the model's own
    import keras
    model = keras.models.load_model(cnn_path)
    imgs = np.stack([np.asarray(Image.open(image_set / p), np.float32) for p in s.table["path"]])
    np.testing.assert_array_equal(s.table["pred_idx"], model(imgs).numpy().argmax(1))
    # the stored metrics are those of the stored heatmaps against the stored masks
    masks = np.stack([np.asarray(Image.open(image_set / p.replace("images/", "masks/"))) > 0
                      for p in s.table["path"]])
    again = attention_metrics(np.asarray(s.heatmaps, np.float32), masks)
    np.testing.assert_allclose(s.table["inside_frac"], again["inside_frac"], atol=2e-3)
    np.testing.assert_allclose(s.table["mask_frac"], masks.mean(axis=(1, 2)), rtol=1e-6)
    # label CAM equals prediction CAM exactly where the prediction is right
    right = s.table["correct"].to_numpy()
    np.testing.assert_array_equal(s.heatmaps[right], s.heatmaps_true[right])
    loaded = biasscope.load(out)
    pd.testing.assert_frame_equal(loaded.table, s.table)


def test_undecodable_image_is_skipped_and_listed(image_set, cnn_path, tmp_path):
    (image_set / "images" / "square" / "square_001.png").write_bytes(b"not an image at all")
    s = biasscope.scan(cnn_path, image_set, out=tmp_path / "o", batch_size=4, progress=False)
    assert len(s.table) == 17
    assert [x["path"] for x in s.meta["skipped"]] == ["images/square/square_001.png"]
    assert s.meta["skipped"][0]["reason"] == "image: not a PNG/JPEG/GIF/BMP/WebP image"
    assert "images/square/square_001.png" not in set(s.table["path"])


def test_formats_grayscale_rgba_and_boxes(tmp_path, cnn_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    rows = []
    for i, (ext, mode) in enumerate([("png", "L"), ("png", "RGBA"), ("jpg", "RGB"), ("bmp", "RGB"),
                                     ("webp", "RGB"), ("jpeg", "RGB")]):
        cls = "circle" if i % 3 == 0 else ("square" if i % 3 == 1 else "stripe")
        (root / "images" / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40, 40, 4 if mode == "RGBA" else 3)).astype(np.uint8)
        img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB").convert(mode)
        rel = f"images/{cls}/f{i}.{ext}"
        img.save(root / rel)
        rows.append({"path": rel, "label": cls, "x0": 0, "y0": 0, "x1": 20, "y1": 10})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    s = biasscope.scan(cnn_path, root, out=tmp_path / "o", batch_size=4, progress=False)
    assert len(s.table) == 6 and not s.meta["skipped"]
    # a 20x10 box of a 40x40 image covers 1/8 of the resized 32x32 mask
    np.testing.assert_allclose(s.table["mask_frac"], 1 / 8)


def test_mask_of_other_aspect_is_resized_with_warning(image_set, cnn_path, tmp_path):
    p = image_set / "masks" / "circle" / "circle_000.png"
    Image.open(p).resize((64, 16), Image.NEAREST).save(p)
    (image_set / "masks" / "square" / "square_003.png").unlink()
    s = biasscope.scan(cnn_path, image_set, out=tmp_path / "o", batch_size=4, progress=False)
    w = s.meta["warnings"]
    assert w["mask_aspect_differs"] == {"count": 1, "examples": ["images/circle/circle_000.png"]}
    assert w["missing_masks"]["count"] == 1
    row = s.table[s.table["path"] == "images/square/square_003.png"].iloc[0]
    assert np.isnan(row["inside_frac"]) and np.isnan(row["mask_frac"])


def test_output_dir_of_another_model_is_refused_unless_overwrite(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    biasscope.scan(cnn_path, image_set, out=out, batch_size=4, progress=False)
    other = tmp_path / "other.keras"
    make_cnn(seed=5).save(other)
    with pytest.raises(BiasscopeError, match="holds a scan of a different model"):
        biasscope.scan(other, image_set, out=out, batch_size=4, progress=False)
    assert json.loads((out / "meta.json").read_text())["model"]["path"] == str(cnn_path.resolve())
    s = biasscope.scan(other, image_set, out=out, batch_size=4, progress=False, overwrite=True)
    assert s.meta["model"]["path"] == str(other.resolve())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(BiasscopeError, match="holds other files"):
        biasscope.scan(other, image_set, out=tmp_path / "foreign", batch_size=4, progress=False)


def test_in_memory_model_and_dataframe_manifest(image_set, tmp_path, monkeypatch):
    monkeypatch.chdir(image_set)
    df = pd.DataFrame({"path": ["images/circle/circle_000.png", "images/square/square_000.png",
                                "images/stripe/stripe_000.png"],
                       "label": ["circle", "square", "stripe"], "site": ["a", "b", "a"]})
    s = biasscope.scan(make_cnn(), df, out=tmp_path / "o", batch_size=2, progress=False)
    assert s.table["site"].tolist() == ["a", "b", "a"]
    assert s.table["inside_frac"].isna().all()


RUNNER = textwrap.dedent("""
    import sys, biasscope
    biasscope.scan(sys.argv[1], sys.argv[2], out=sys.argv[3], batch_size=4, chunk_size=8, progress=False)
""")


def test_resume_after_a_real_kill_gives_the_uninterrupted_result(tmp_path):
    data = make_image_set(tmp_path / "d", n_per_class=60)
    model = tmp_path / "m.keras"
    make_cnn().save(model)
    out = tmp_path / "killed"
    kill_once_stored(RUNNER, [model, data, out], out / "chunks" / "rows-00002.parquet")
    assert json.loads((out / "meta.json").read_text())["status"] == "running"
    resumed = biasscope.scan(model, data, out=out, batch_size=4, chunk_size=8, progress=False)
    assert resumed.meta["timings"]["resumed_at"] >= 24
    clean = biasscope.scan(model, data, out=tmp_path / "clean", batch_size=4, chunk_size=8, progress=False)
    pd.testing.assert_frame_equal(resumed.table, clean.table)
    np.testing.assert_array_equal(resumed.heatmaps, clean.heatmaps)
    np.testing.assert_array_equal(resumed.heatmaps_true, clean.heatmaps_true)


def test_in_memory_arrays(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (10, 40, 40, 3)).astype(np.uint8)
    masks = np.zeros((10, 40, 40), bool)
    masks[:, :20, :] = True  # the top half
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    s = biasscope.scan(make_cnn(), (images, labels, masks), out=tmp_path / "o", batch_size=4, progress=False)
    assert s.table["path"].tolist()[:2] == ["array[0]", "array[1]"]
    assert s.table["label_idx"].tolist() == labels.tolist()
    np.testing.assert_allclose(s.table["mask_frac"], 0.5)
    named = biasscope.scan(make_cnn(), (images, np.array(["b", "a", "c"] * 3 + ["a"])), out=tmp_path / "p",
                           batch_size=4, progress=False)
    assert named.meta["classes"] == ["a", "b", "c"] and named.table["inside_frac"].isna().all()
    with pytest.raises(BiasscopeError, match="labels must have shape \\(10,\\)"):
        biasscope.scan(make_cnn(), (images, labels[:3]), out=tmp_path / "q", progress=False)


def test_analysis_outputs_are_stored_and_gates_evaluated(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    s = biasscope.scan(cnn_path, image_set, out=out, batch_size=4, counterfactuals=False,
                       fail_on=["misclassified", "accuracy<0.0"], progress=False)
    for name in ("analysis.json", "findings.json", "summary.json"):
        assert (out / name).is_file()
    assert s.table["cluster"].notna().any() and np.isfinite(s.table["embed_x"]).all()
    kinds = {f["kind"] for f in s.findings}
    assert ("misclassified" in kinds) == (not s.table["correct"].all())
    flagged = s.table["flags"].map(lambda f: "misclassified" in list(f))
    np.testing.assert_array_equal(flagged.to_numpy(), ~s.table["correct"].to_numpy())
    gates = {g["expr"]: g["tripped"] for g in s.summary["gates"]}
    assert gates == {"misclassified": "misclassified" in kinds, "accuracy<0.0": False}
    assert s.summary["accuracy"] == pytest.approx(s.table["correct"].mean())
    with pytest.raises(BiasscopeError, match="--fail-on 'acuracy<0.5'"):
        biasscope.scan(cnn_path, image_set, out=out, fail_on=["acuracy<0.5"], progress=False)


def test_finished_scan_redoes_only_the_analysis(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    biasscope.scan(cnn_path, image_set, out=out, batch_size=4, counterfactuals=False, progress=False)
    heat_before = (out / "heatmaps.npy").stat().st_mtime_ns
    s = biasscope.scan(cnn_path, image_set, out=out, batch_size=4, counterfactuals=False, seed=3,
                       progress=False)
    assert (out / "heatmaps.npy").stat().st_mtime_ns == heat_before
    assert s.analysis["params"]["seed"] == 3


def test_the_counterfactual_pass_reads_the_cam_pass_copy_not_the_files(image_set, cnn_path, tmp_path,
                                                                      monkeypatch):
    """A local scan keeps its decoded inputs for the counterfactual pass, which builds its
    batches from them (no file read twice) and stores what a pass over the files stores."""
    from biasscope import decoded

    (image_set / "images" / "circle" / "circle_001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    used = []
    batches = decoded.DecodedInputs.batches

    def spy(self, *a, **k):
        used.append(int(self.stored.sum()))
        return batches(self, *a, **k)

    monkeypatch.setattr(decoded.DecodedInputs, "batches", spy)
    copied = biasscope.scan(cnn_path, image_set, out=tmp_path / "a", batch_size=4, progress=False)
    assert used == [17]  # every readable image, one pass over the copy
    monkeypatch.setattr(decoded.DecodedInputs, "create", classmethod(lambda cls, *a, **k: None))
    files = biasscope.scan(cnn_path, image_set, out=tmp_path / "b", batch_size=4, progress=False)
    assert used == [17]
    a, b = (s.analysis["counterfactuals"] for s in (copied, files))
    assert a["n_with_mask"] == 17 and a["per_image"] == b["per_image"] and a["classes"] == b["classes"]


def test_the_analysis_and_findings_go_to_the_helper_process_and_fall_back_when_it_fails(
        image_set, cnn_path, tmp_path, monkeypatch):
    """With the console script's helper, the scan sends it the analysis (the table without its
    list columns) and then the findings (the table packed, without its flags; the maps as their
    stored files), and stores what the helper's handlers return; when the helper fails, both
    run here. Either way the stored result is the one computed in this process."""
    import pickle

    from biasscope import helper

    local = biasscope.scan(cnn_path, image_set, out=tmp_path / "local", batch_size=4, progress=False)
    assert local.findings and local.analysis["counterfactuals"].get("per_image")

    class FakeHelper:
        def __init__(self, fail):
            self.fail, self.sent = fail, []

        def submit(self, kind, payload):
            self.sent.append((kind, payload))
            return True

        def result(self):
            if self.fail:
                return None
            kind, payload = self.sent[-1]
            # what the helper process does with the request, after the trip through a pipe
            return pickle.loads(pickle.dumps(helper._HANDLERS[kind](pickle.loads(pickle.dumps(payload)))))

    for fail in (False, True):
        fake = FakeHelper(fail)
        monkeypatch.setattr(helper, "current", lambda: fake)
        out = tmp_path / f"h{fail}"
        s = biasscope.scan(cnn_path, image_set, out=out, batch_size=4, progress=False)
        assert [k for k, _ in fake.sent] == ["analyse", "findings"]
        (table, heat), _ = fake.sent[0][1]
        assert not {"top5", "top5_prob", "flags"} & set(table.columns)
        assert heat == ("npy", str(out / "heatmaps.npy"))  # the stored file, mapped
        ctx_args, maps = fake.sent[1][1]
        slim, packed, columns = ctx_args["table"]
        assert set(packed) == {"top5", "top5_prob"} and "flags" not in columns
        assert maps["heatmaps"][0] == ("npy", str(out / "heatmaps.npy"))
        assert maps["heatmaps_true"][0] == ("npy", str(out / "heatmaps_true.npy"))
        for key in ("clusters", "classes", "projection", "attractors", "detectors"):
            assert s.analysis[key] == local.analysis[key], (fail, key)
        assert s.findings == local.findings
        assert s.summary["verdict"] == local.summary["verdict"]
        for col in ("cluster", "embed_x", "embed_y"):
            pd.testing.assert_series_equal(s.table[col], local.table[col])
        assert s.table["flags"].map(list).tolist() == local.table["flags"].map(list).tolist()


def test_a_packed_table_comes_back_equal():
    """:func:`biasscope.helper.pack_frame` sends columns of equal-length arrays as one array
    each and leaves other object columns (ragged, lists, strings) as they are;
    :func:`~biasscope.helper.unpack_frame` gives back the same table."""
    import pickle

    from biasscope import helper

    t = pd.DataFrame({"a": [1, 2, 3], "top5": [np.array([2, 0], np.int32), np.array([1, 2], np.int32),
                                                  np.array([0, 1], np.int32)],
                      "ragged": [np.zeros(1), np.zeros(2), np.zeros(3)], "lists": [[1], [], [2, 3]],
                      "name": ["x", "y", "z"], "flags": [[], [], []]})
    sent = helper.pack_frame(t, drop=("flags",))
    assert set(sent[1]) == {"top5"} and sent[1]["top5"].shape == (3, 2)
    back = helper.unpack_frame(pickle.loads(pickle.dumps(sent)))
    ref = t.drop(columns=["flags"])
    assert list(back.columns) == list(ref.columns)
    for c in ref.columns:
        for x, y in zip(ref[c], back[c]):
            assert type(x) is type(y) and np.array_equal(x, y) and getattr(x, "dtype", None) == getattr(y, "dtype", None)
    assert helper.unpack_frame(helper.pack_frame(t.iloc[:0])).empty
