"""The thin CLI: exit codes, one-line errors, summary output, layers and bench."""

import json

import pytest
from typer.testing import CliRunner

from biasscope.cli import app
from conftest import make_cnn

runner = CliRunner()


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    out = result.output.strip()
    assert "Traceback" not in out
    assert out.startswith("error:") and len(out.splitlines()) == 1, out
    for f in fragments:
        assert f in out, out


def test_scan_prints_summary_and_writes_result(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(out), "--batch-size", "4",
                            "--chunk-size", "10"])
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "mean inside_frac" in r.output and f"result: {out}" in r.output
    assert "verdict: " in r.output and r.output.index("verdict: ") < r.output.index("biasscope scan")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete"
    assert meta["options"]["chunk_size"] == 8  # whole batches


def _result(summary, findings=()):
    from types import SimpleNamespace

    return SimpleNamespace(summary=summary, findings=list(findings), analysis={})


def test_verdict_block_prints_root_causes_and_nothing_for_old_scans(capsys):
    from biasscope.cli import _print_findings, _print_verdict
    from biasscope.summary import verdict

    fs = [{"id": "spurious_feature/0", "kind": "spurious_feature", "class": "seven", "cluster": None,
           "severity": 0.91, "title": "a feature pulls predictions to 'seven'",
           "evidence": {"verdict_line": "'seven' is predicted from [red]a corner patch[/]"}},
          {"id": "background_reliance/1", "kind": "background_reliance", "class": "seven",
           "cluster": None, "severity": 0.8, "title": "'seven' relies on backgrounds",
           "evidence": {"explained_by": ["spurious_feature/0"]}}]
    res = _result({"verdict": verdict(fs)}, fs)
    _print_verdict(res)
    _print_findings(res)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "verdict: shortcut - 1 root cause"
    assert lines[1].split() == ["0.91", "spurious_feature", "'seven'", "is", "predicted", "from",
                                "[red]a", "corner", "patch[/]"]  # rich markup in a line is escaped
    assert "1 finding(s) explained by another finding" in lines[2]
    assert "top findings" in lines[3]
    _print_verdict(_result({"verdict": verdict([])}))
    assert capsys.readouterr().out.strip() == "verdict: clean - no shortcut found at severity >= 0.5"
    _print_verdict(_result({"accuracy": 0.9}))  # a summary from before the verdict
    _print_verdict(_result({}))
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("args, fragments", [
    (lambda m, d, t: ["scan", str(d), str(d)], ["not a SavedModel"]),
    (lambda m, d, t: ["scan", str(t / "junk.keras"), str(d)], ["not a Keras model file", "junk.keras"]),
    (lambda m, d, t: ["scan", str(m), str(d), "--layer", "last_cnv"], ["no layer 'last_cnv'", "last_conv"]),
    (lambda m, d, t: ["scan", str(m), str(t / "empty")], ["no images found"]),
    (lambda m, d, t: ["scan", str(m), str(d), "--image-size", "10", "12"], ["--image-size 10 12", "32x32"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments, image_set, cnn_path, tmp_path):
    (tmp_path / "junk.keras").write_bytes(b"this is not a zip file")
    (tmp_path / "empty" / "images" / "a").mkdir(parents=True)
    _one_line_error(runner.invoke(app, args(cnn_path, image_set, tmp_path)), *fragments)


def test_class_mismatch_is_one_line_exit_2(image_set, tmp_path):
    m = tmp_path / "four.keras"
    make_cnn(4).save(m)
    _one_line_error(runner.invoke(app, ["scan", str(m), str(image_set), "--out", str(tmp_path / "o")]),
                    "3 classes", "4 outputs", "--class-map")


def test_refuses_other_scan_and_keeps_it(image_set, cnn_path, tmp_path):
    out = tmp_path / "o"
    assert runner.invoke(app, ["scan", str(cnn_path), str(image_set), "--out", str(out)]).exit_code == 0
    before = (out / "scan.parquet").read_bytes()
    other = tmp_path / "other.keras"
    make_cnn(seed=9).save(other)
    _one_line_error(runner.invoke(app, ["scan", str(other), str(image_set), "--out", str(out)]),
                    "different model", "--overwrite")
    assert (out / "scan.parquet").read_bytes() == before


def test_layers_marks_the_automatic_choice(cnn_path):
    r = runner.invoke(app, ["layers", str(cnn_path)])
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if "last_conv" in ln)
    assert "auto" in line
    assert "auto" not in next(ln for ln in r.output.splitlines() if "conv2" in ln)


def test_bench_reports_ratios(cnn_path, tmp_path):
    js = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", str(cnn_path), "--n", "32", "--batch-size", "8", "--recipe-sample", "2",
                            "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["n"] == 32 and res["gradcam_traces"] == 1
    assert res["scan_over_forward"] == pytest.approx(res["scan_s"] / res["forward_s"])
    assert res["recipe_per_image_s"] > 0 and "x forward" in r.output


def test_bench_times_each_method_and_scorecam_per_n(cnn_path, tmp_path):
    js = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", str(cnn_path), "--n", "16", "--batch-size", "8", "--recipe-sample", "0",
                            "--method", "layercam", "--method", "scorecam", "--scorecam-channels", "2",
                            "--scorecam-channels", "16", "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert list(res["methods"]) == ["layercam", "scorecam (N=2)", "scorecam (N=16)"]
    for fig in res["methods"].values():
        assert fig["traces"] == 1
        assert fig["scan_over_forward"] == pytest.approx(fig["scan_s"] / res["forward_s"])
    assert res["methods"]["scorecam (N=16)"]["scorecam_channels"] == 16
    assert "scorecam (N=16)" in r.output and "recipe_per_image_s" not in res
    _one_line_error(runner.invoke(app, ["bench", str(cnn_path), "--method", "gradcam++"]),
                    "--method 'gradcam++'", "available methods are gradcam, gradcampp")


def test_bench_needs_model_or_arch():
    _one_line_error(runner.invoke(app, ["bench"]), "MODEL path or --arch")


def test_legacy_h5_model_scans(image_set, tmp_path):
    h5 = tmp_path / "legacy.h5"
    make_cnn().save(h5)
    r = runner.invoke(app, ["scan", str(h5), str(image_set), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["layer"] == "last_conv"


def test_savedmodel_without_keras_layers_is_explained(image_set, tmp_path):
    sm = tmp_path / "exported"
    make_cnn().export(sm, verbose=False)
    _one_line_error(runner.invoke(app, ["scan", str(sm), str(image_set)]), "SavedModel", ".keras")


@pytest.mark.parametrize("argv, fragment", [
    (["scan", "--bogus"], "No such option: --bogus"),
    (["scan", "missing.keras", "data"], "path 'missing.keras' does not exist"),
    (["bench", "--image-size", "64", "x"], "--image-size"),
])
def test_usage_errors_from_the_console_script_are_one_line(argv, fragment, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "biasscope.cli", *argv], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, err


def test_bench_analysis_times_synthetic_rows(tmp_path):
    js = tmp_path / "a.json"
    r = runner.invoke(app, ["bench", "--analysis", "--n", "600", "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["n"] == 600 and res["analysis_s"] > 0 and res["n_clusters"] >= 4  # >= 1 per class
    assert "600 synthetic rows" in r.output


def test_bench_whole_job_times_every_stage_against_the_cam_pass(image_set, tmp_path, monkeypatch):
    import csv

    from biasscope import benchmark
    from biasscope.bench import run_whole_job

    # the benchmark's validation split stood in for by the small image set (same layout)
    val = tmp_path / "cache" / "bias-benchmark-default" / "val"
    val.parent.mkdir(parents=True)
    (val.parent / "val").symlink_to(image_set)
    with open(image_set / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "mask", "background"])
        for i, f in enumerate(sorted((image_set / "images").rglob("*.png"))):
            rel = f.relative_to(image_set)
            w.writerow([rel, f.parent.name, rel.as_posix().replace("images/", "masks/", 1), "ab"[i % 2]])
    monkeypatch.setattr(benchmark, "build_benchmark", lambda *a, **k: None)
    monkeypatch.setattr(benchmark, "train_demo_model", lambda *a, **k: make_cnn(3, 32))
    res = run_whole_job(45, batch_size=8, cache_dir=tmp_path / "cache", progress=False)
    st = res["stages"]
    assert res["n"] == 45 and set(st) == {"setup_s", "cam_pass_s", "assemble_s", "counterfactuals_s",
                                          "occlusion_s", "analysis_s", "findings_s", "report_s", "rest_s"}
    assert st["counterfactuals_s"] > 0 and st["report_s"] > 0 and st["cam_pass_s"] > 0
    assert sum(st.values()) == pytest.approx(res["total_s"], rel=1e-6)
    assert res["over_pass"]["cam_pass"] == 1.0
    assert res["total_over_pass"] == pytest.approx(res["total_s"] / st["cam_pass_s"])


_IMPORT_TF = """
import gc, sys
from biasscope import _tf
cli = sys.argv[1] == "y"
_tf.FREEZE_AFTER_IMPORT = cli
if cli:
    _tf.HIDE_DURING_IMPORT = ("matplotlib", "scipy", "sklearn")
_tf.import_tf()
hidden = [m for m in ("matplotlib", "scipy", "sklearn") if m in sys.modules]
import keras
keras.layers.Dense(2)  # Keras works
import sklearn.neighbors  # and what was hidden imports afterwards
sklearn.neighbors.NearestNeighbors(n_neighbors=1).fit([[0.0], [1.0]])
print(gc.isenabled(), gc.get_freeze_count(), ",".join(hidden) or "-")
"""


def test_the_command_line_freezes_tensorflows_objects_and_a_library_user_does_not(monkeypatch):
    """``main`` (the console script) asks for :func:`gc.freeze` after the TensorFlow import and
    hides Keras' optional imports during it; ``import_tf`` does either only when asked, leaves
    the collector on either way, and what it hid imports normally after."""
    import subprocess
    import sys

    import biasscope.cli as cli
    from biasscope import _tf

    monkeypatch.setattr(_tf, "FREEZE_AFTER_IMPORT", False)
    monkeypatch.setattr(_tf, "HIDE_DURING_IMPORT", ())
    monkeypatch.setattr(cli, "app", lambda **kw: 0)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 0 and _tf.FREEZE_AFTER_IMPORT is True
    assert {"matplotlib", "scipy", "sklearn"} <= set(_tf.HIDE_DURING_IMPORT)

    got = {}
    for flag in ("y", "n"):
        r = subprocess.run([sys.executable, "-c", _IMPORT_TF, flag], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        enabled, frozen, present = r.stdout.split()
        got[flag] = (enabled, int(frozen), present)
    assert got["y"][0] == got["n"][0] == "True"
    assert got["y"][1] > 100_000 and got["n"][1] == 0  # TensorFlow's objects, or none
    assert got["y"][2] == "-"  # none was imported with TensorFlow
    # without the command line's setting they are (all are installed for the tests)
    assert got["n"][2] == "matplotlib,scipy,sklearn"
