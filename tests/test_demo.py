"""`biasscope demo` end to end on the small benchmark variant."""

import json

import pytest
from typer.testing import CliRunner

from biasscope.cli import app


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets").mkdir()  # a checkout: data is cached under datasets/generated
    r = CliRunner().invoke(app, ["demo", "--size", "small", "--out", "reports/demo"])
    assert r.exit_code == 0, r.output
    data = tmp_path / "datasets" / "generated" / "bias-benchmark-small"
    truth = json.loads((data / "truth.json").read_text())
    meta = json.loads((tmp_path / "reports" / "demo" / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["n_scanned"] == truth["counts"]["val"]["n"]
    assert meta["attributes"] == ["background"]
    assert "worst-group accuracy" in r.output and "average accuracy" in r.output
    assert "reports/demo" in r.output
    # second run reuses the cached data and model
    mtime = (data / "model.keras").stat().st_mtime
    r2 = CliRunner().invoke(app, ["demo", "--size", "small", "--out", "reports/demo"])
    assert r2.exit_code == 0, r2.output
    assert (data / "model.keras").stat().st_mtime == mtime
