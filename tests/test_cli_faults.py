"""The fault and bad-input matrix of issue 13, through the CLI: exit code, one-line message, no
traceback, and nothing stored lost (a full disk, two scans into one folder, Ctrl-C)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import biasscope
from biasscope import api, store
from biasscope.cli import app
from biasscope.findings import REGISTRY
from conftest import make_cnn, make_image_set

runner = CliRunner()
FAST = ["--no-report", "--no-counterfactuals", "--batch-size", "4"]


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the console width


def _one_line_error(result, *fragments):
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    # one line, the last (a progress bar that was running may stand above it)
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for f in fragments:
        assert f in errors[0], errors[0]


def test_out_naming_a_file_is_refused(image_set, cnn_path, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    _one_line_error(runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(target)]),
                    f"--out {target} is a file")
    assert target.read_text() == "keep me"
    inside = target / "scan"  # a folder that cannot be made: its parent is that file
    _one_line_error(runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(inside)]),
                    f"--out {inside}: cannot create the folder (Not a directory)")


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


#: chunks of 4 images (the CLI's default is 64 batches), so that a tiny scan has several
SMALL_CHUNKS = ["--chunk-size", "4"]


def test_full_disk_keeps_the_stored_chunks_and_resumes(tmp_path, monkeypatch):
    data = make_image_set(tmp_path / "data", n_per_class=8)  # 24 images, 6 chunks
    model = tmp_path / "m.keras"
    make_cnn().save(model)
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "3m")
    try:
        if mounted:
            # leave room for meta.json and a chunk or two, not for all six
            st = os.statvfs(disk)
            ballast = st.f_bavail * st.f_frsize - 40 * 1024
            with open(disk / "ballast", "wb") as fh:
                fh.write(b"\0" * ballast)
        else:
            disk.mkdir()
            real, calls = store._save_npy, []

            def save_until_full(path, arr):
                calls.append(path)
                if len(calls) > 4:  # two chunks stored, the third one's write fails
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                real(path, arr)

            monkeypatch.setattr(store, "_save_npy", save_until_full)
        out = disk / "scan"
        args = ["scan", str(model), str(data), *FAST, *SMALL_CHUNKS]
        _one_line_error(runner.invoke(app, [*args, "--out", str(out)]),
                        f"no space left on device writing {out}")
        chunks = sorted((out / "chunks").glob("rows-*.parquet"))
        assert 1 <= len(chunks) < 6
        assert json.loads((out / "meta.json").read_text())["status"] == "running"
        assert not list(out.rglob("*.tmp")) and not (out / store.LOCK).exists()
        for k, rows in enumerate(chunks):  # every committed chunk loads whole
            table = pd.read_parquet(rows)
            assert table["index"].tolist() == list(range(4 * k, 4 * k + 4))
            for prefix in ("heat", "heat_true"):
                heat = np.load(out / "chunks" / f"{prefix}-{k:05d}.npy", allow_pickle=False)
                assert heat.shape == (4, 8, 8) and np.isfinite(heat).all()
        bigger = tmp_path / "bigger"  # a larger disk: the folder moved there, then resumed
        shutil.copytree(out, bigger)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
    monkeypatch.undo()
    r = runner.invoke(app, [*args, "--out", str(bigger)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert json.loads((bigger / "meta.json").read_text())["timings"]["resumed_at"] == 4 * len(chunks)
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "clean")]).exit_code == 0
    resumed, clean = biasscope.load(bigger), biasscope.load(tmp_path / "clean")
    pd.testing.assert_frame_equal(resumed.table, clean.table)
    np.testing.assert_array_equal(resumed.heatmaps, clean.heatmaps)
    np.testing.assert_array_equal(resumed.heatmaps_true, clean.heatmaps_true)


def test_full_disk_while_assembling_resumes_from_the_stored_chunks(image_set, cnn_path, tmp_path,
                                                                  monkeypatch):
    real, failed = store.write_table, []

    def write_table_once_full(out_dir, table):
        if not failed:
            failed.append(out_dir)
            raise OSError("2073600 requested and 1570752 written")  # what pyarrow says, no errno
        real(out_dir, table)

    monkeypatch.setattr(api, "write_table", write_table_once_full)
    out = tmp_path / "o"
    args = ["scan", str(cnn_path), str(image_set), "--out", str(out), *FAST, *SMALL_CHUNKS]
    _one_line_error(runner.invoke(app, args), f"no space left on device writing {out}")
    assert len(list((out / "chunks").glob("rows-*.parquet"))) == 5  # 18 images, chunks of 4
    assert json.loads((out / "meta.json").read_text())["status"] == "running"
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    s = biasscope.load(out)
    assert s.meta["timings"]["resumed_at"] == 18 and len(s.table) == 18 and not (out / "chunks").exists()


def test_second_scan_into_a_running_scans_folder_refuses(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / store.LOCK).write_text(f"{holder.pid}\n")
        _one_line_error(runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(out), *FAST]),
                        f"another scan is running in {out} (pid {holder.pid})")
        assert (out / store.LOCK).read_text() == f"{holder.pid}\n"  # the running scan's lock stays
        assert not (out / "meta.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_released(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / store.LOCK).write_text(f"{gone.pid}\n")
    r = runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(out), *FAST])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert f"taking over the stale lock of a scan that is gone (pid {gone.pid})" in _flat(r.output)
    assert not (out / store.LOCK).exists()


def test_lock_is_held_while_scanning_and_released_on_error(image_set, cnn_path, tmp_path, monkeypatch):
    out = tmp_path / "o"
    seen = []

    def fail(*a, **k):
        seen.append((out / store.LOCK).read_text())
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(store.ChunkWriter, "add", fail)
    with pytest.raises(OSError):
        biasscope.scan(cnn_path, image_set, out=out, batch_size=4, progress=False)
    assert seen == [f"{os.getpid()}\n"] and not (out / store.LOCK).exists()


@pytest.mark.parametrize("name, content", [
    ("junk.keras", b"this is not a zip file"),
    ("notes.h5", b"just some text, not HDF5"),
    ("weights.bin", b"\x00" * 64),
])
def test_a_file_that_is_not_a_model_says_so(name, content, image_set, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    _one_line_error(runner.invoke(app, ["scan", str(path), str(image_set)]),
                    f"not a Keras model file (.keras zip, .h5 or SavedModel folder): {path}")


def test_undecodable_images_are_skipped_with_plain_reasons(image_set, cnn_path, tmp_path):
    (image_set / "images" / "square" / "square_001.png").write_bytes(b"not an image at all")
    jpg = image_set / "images" / "circle" / "circle_zz.jpg"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    out = tmp_path / "o"
    r = runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(out), *FAST])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    reasons = {s["path"]: s["reason"] for s in json.loads((out / "meta.json").read_text())["skipped"]}
    assert reasons == {"images/square/square_001.png": "image: not a PNG/JPEG/GIF/BMP/WebP image",
                       "images/circle/circle_zz.jpg": "image: truncated JPEG"}
    flat = _flat(r.output)
    assert "skipped images/square/square_001.png: image: not a PNG/JPEG/GIF/BMP/WebP image" in flat
    assert "skipped images/circle/circle_zz.jpg: image: truncated JPEG" in flat
    assert "function_node" not in r.output and "device:CPU" not in r.output


def test_all_zero_heatmaps_warn_and_heatmap_detectors_say_why(image_set, tmp_path):
    model = make_cnn()
    conv = model.get_layer("last_conv")
    kernel, bias = conv.get_weights()
    conv.set_weights([np.zeros_like(kernel), np.full_like(bias, -1.0)])  # dead ReLUs
    path = tmp_path / "dead.keras"
    model.save(path)
    out = tmp_path / "o"
    r = runner.invoke(app, ["scan", str(path), str(image_set), "--out", str(out), *FAST])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    flat = _flat(r.output)
    assert "warning: the heatmaps are all zero at layer last_conv:" in flat
    assert "dead ReLUs" in flat and "saturated softmax" in flat
    assert "inside_frac │ no masks" not in flat  # the masks are there; the CAMs are empty
    assert re.search(r"inside_frac │ undefined: the heatmaps are all zero[ │]*\(18 masked[ │]*images\)", flat)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["warnings"]["heatmaps_all_zero"].startswith("the heatmaps are all zero at layer last_conv: ")
    detectors = json.loads((out / "analysis.json").read_text())["detectors"]
    heat = [n for n, cls in REGISTRY.items() if cls.needs_heatmaps]
    assert set(heat) == {"clever_hans_cluster", "off_object_attention", "spurious_background"}
    for name in heat:
        assert detectors[name]["status"] == "skipped", name
        assert detectors[name]["reason"].startswith("the heatmaps are all zero at layer last_conv")
        assert f"{name} not run: the heatmaps are all zero" in flat
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heatmaps_all_zero"] is True and summary["n_with_mask"] == 18
    r = runner.invoke(app, ["report", str(out)])  # the report says so too, not "no masks"
    assert r.exit_code == 0, r.output
    html = (out / "report.html").read_text()
    assert "undefined: the heatmaps are all zero at last_conv (18 masked images)" in html
    assert "no masks: attention-on-object" not in html and "No masks in this scan" not in html
    findings = json.loads((out / "findings.json").read_text())
    assert all(f["severity"] >= 0.005 for f in findings)
    assert not any(f["kind"] in heat for f in findings)


def test_ctrl_c_says_how_much_is_stored_and_how_to_resume(tmp_path):
    data = make_image_set(tmp_path / "data", n_per_class=200, size=32)  # 600 images, batch 1
    model = tmp_path / "m.keras"
    make_cnn().save(model)
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "biasscope.cli", "scan", str(model), str(data),
                             "--out", str(out), "--batch-size", "1", "--no-report", "--no-counterfactuals"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "200"},
                            # a test run started in the background inherits SIGINT ignored (and
                            # Python then installs no KeyboardInterrupt handler): the scan gets
                            # the default, as in a terminal
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first_chunk = out / "chunks" / "rows-00000.parquet"  # 64 images stored: the scan is under way
    deadline = time.time() + 60
    # poll without sleeping: the 600-image pass lasts about 2 s, and a test process that sleeps
    # between looks can be left off the 2 busy cores until the pass is over
    while not first_chunk.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0)
    assert proc.poll() is None, "the scan ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1, stderr
    m = re.fullmatch(r"interrupted: (\d+) of 600 images stored; run the same command again to resume", lines[0])
    assert m, lines[0]
    stored = int(m.group(1))
    assert 64 <= stored and (stored % 64 == 0 or stored == 600)
    assert not (out / store.LOCK).exists()


def test_manifest_paths_outside_data_are_allowed(image_set, cnn_path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(image_set / "images" / "circle" / "circle_000.png", elsewhere / "up.png")
    shutil.copy(image_set / "images" / "square" / "square_000.png", elsewhere / "abs.png")
    manifest = pd.DataFrame({
        "path": ["images/stripe/stripe_000.png", "../elsewhere/up.png", str(elsewhere / "abs.png")],
        "label": ["stripe", "circle", "square"],
    })
    manifest.to_csv(image_set / "manifest.csv", index=False)
    out = tmp_path / "o"
    r = runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(out), *FAST])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    s = biasscope.load(out)
    assert sorted(s.table["path"]) == sorted(manifest["path"]) and not s.meta["skipped"]
