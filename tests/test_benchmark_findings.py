"""End to end on the built-in benchmark (default size): the planted flaws must be found.

Builds the biased benchmark (``zero``, ``one``, ``two`` shown on "their" background 95% of the
time in train, ``three`` the control) and the unbiased control (``bias=0``), trains the demo CNN
on each (about a minute apiece on 2 CPU cores), and checks the counterfactual tests and the
findings of a full scan against ``truth.json``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

keras = pytest.importorskip("keras")

import biasscope  # noqa: E402
from biasscope.benchmark import build_benchmark, train_demo_model  # noqa: E402
from biasscope.counterfactuals import run_counterfactuals  # noqa: E402
from biasscope.data import load_dataset  # noqa: E402


def _trained(tmp_path_factory, name, **build):
    root = build_benchmark(tmp_path_factory.mktemp("benchmark") / name, size="default", **build)
    return root, train_demo_model(root), json.loads((root / "truth.json").read_text())


@pytest.fixture(scope="session")
def biased(tmp_path_factory):
    return _trained(tmp_path_factory, "biased")


@pytest.fixture(scope="session")
def unbiased(tmp_path_factory):
    return _trained(tmp_path_factory, "unbiased", bias=0)


@pytest.fixture(scope="session")
def biased_scan(biased, tmp_path_factory):
    root, model_path, _ = biased
    return biasscope.scan(model_path, root / "val", out=tmp_path_factory.mktemp("scan_biased"),
                          progress=False)


@pytest.fixture(scope="session")
def unbiased_scan(unbiased, tmp_path_factory):
    root, model_path, _ = unbiased
    return biasscope.scan(model_path, root / "val", out=tmp_path_factory.mktemp("scan_unbiased"),
                          progress=False)


def _by_kind(findings, kind):
    return {f["class"]: f for f in findings if f["kind"] == kind}


def _figures(cf):
    return {c: {k: f[k] for k in ("bg_gap", "bg_gap_ci", "only_bg_rate", "transplant_rate", "flip_rate")}
            for c, f in cf["classes"].items()}


def test_counterfactuals_find_the_planted_background_shortcuts(biased):
    root, model_path, truth = biased
    model = keras.models.load_model(model_path, compile=False)
    ds = load_dataset(root / "val", n_outputs=len(truth["classes"]))
    t0 = time.perf_counter()
    cf = run_counterfactuals(model, ds, image_size=(truth["canvas"],) * 2, channels=3,
                             batch_size=16, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"\nrun_counterfactuals on {cf['n_with_mask']} images: {elapsed:.1f} s")
    print(json.dumps(_figures(cf), indent=1))
    assert cf["n_with_mask"] == len(ds) == 800
    for c in truth["biased_classes"]:
        f = cf["classes"][c]
        assert f["bg_gap_ci"][0] > 0, (c, f)
    for c in truth["control_classes"]:
        f = cf["classes"][c]
        assert f["bg_gap"] <= 0.15, (c, f)


SHORTCUT_KINDS = ("spurious_feature", "clever_hans_cluster", "spurious_background",
                  "background_reliance")


def test_the_scan_reports_the_shortcut_classes_and_not_the_control(biased_scan, biased):
    truth = biased[2]
    feature = _by_kind(biased_scan.findings, "spurious_feature")
    strong = {f["class"] for f in biased_scan.findings if f["kind"] in SHORTCUT_KINDS
              and f["severity"] >= 0.5 and not f["evidence"].get("explained_by")}
    summary = {c: round(feature[c]["severity"], 3) if c in feature else None for c in truth["classes"]}
    print("\nspurious_feature severity per class:", summary)
    assert strong == set(truth["biased_classes"]), summary
    for c, bg in truth["biased_classes"].items():
        ev = feature[c]["evidence"]
        # one finding per (class, cause): the class's background tests are merged into it
        assert "background_tests" in ev or "attention" in ev, sorted(ev)
        # its most attracting background is the one planted for it
        assert next(iter(ev["per_attribute"]["background"])) == bg, ev["per_attribute"]
    for c in truth["control_classes"]:
        # measured: the control is read into ~5% of the backgrounds and pulls 2% of the other
        # classes' objects there (a spurious_feature at 0.40, below the bar)
        assert c not in feature or feature[c]["severity"] < 0.5
        assert not [f for f in biased_scan.findings if f["class"] == c and f["kind"] in SHORTCUT_KINDS
                    and f["severity"] >= 0.5], c
    cf = biased_scan.analysis["counterfactuals"]
    assert set(cf["classes"]) == set(truth["classes"])


def _label_issue_scores(scan, truth):
    flipped = {f["path"] for f in truth["flipped"]}
    t = scan.table
    flagged = set(t["path"][np.array(["label_issue" in f for f in t["flags"]])])
    hit = len(flagged & flipped)
    return hit / max(len(flagged), 1), hit / len(flipped), len(flagged), len(flipped)


@pytest.mark.parametrize("which", ["biased", "unbiased"])
def test_label_issues_recover_the_flipped_labels(which, request):
    # The biased model is the hard case: its own probabilities are confidently wrong about
    # many correctly labelled images (the background shortcut), so the object view decides.
    scan, (_, _, truth) = request.getfixturevalue(f"{which}_scan"), request.getfixturevalue(which)
    precision, recall, n_flagged, n_flipped = _label_issue_scores(scan, truth)
    print(f"\n{which} model, label_issue: {n_flagged} flagged, {n_flipped} flipped, precision "
          f"{precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.8 and recall >= 0.8, (precision, recall, n_flagged, n_flipped)
    views = {v for f in scan.findings if f["kind"] == "label_issue" for v in f["evidence"]["views"]}
    assert views == {"object"}


def test_the_unbiased_model_has_no_strong_background_finding(unbiased_scan):
    strong = [(f["kind"], f["class"], round(f["severity"], 3)) for f in unbiased_scan.findings
              if f["kind"] in SHORTCUT_KINDS and f["severity"] >= 0.5]
    print("\nunbiased model, background findings:",
          [(f["kind"], f["class"], round(f["severity"], 3)) for f in unbiased_scan.findings
           if f["kind"] in ("spurious_background", "background_reliance")])
    assert strong == []


@pytest.fixture(scope="session")
def watermarked(tmp_path_factory):
    # no background shortcut: the watermark on every training 'three' is the only shortcut
    return _trained(tmp_path_factory, "watermark", bias=0, watermark_class="three")


def test_watermark_is_a_clever_hans_cluster_on_the_patch(watermarked, tmp_path_factory):
    root, model_path, truth = watermarked
    s = biasscope.scan(model_path, root / "val", out=tmp_path_factory.mktemp("scan_watermark"),
                       counterfactuals=False, report=False, progress=False)
    wm = truth["watermark"]
    hans = [f for f in s.findings if f["kind"] == "clever_hans_cluster" and f["class"] == wm["class"]]
    assert hans, [(f["kind"], f["class"], f["title"]) for f in s.findings]
    canvas = truth["canvas"]
    box = wm["box"]
    # the patch, widened by one cell of the 8x8 Grad-CAM layer (the heatmap's resolution)
    cell = 1 / 8
    x1, y1 = (box["x"] + box["width"]) / canvas + cell, (box["y"] + box["height"]) / canvas + cell
    for f in hans:
        mh = np.asarray(f["evidence"]["mean_heatmap"])
        r, c = np.unravel_index(mh.argmax(), mh.shape)
        px, py = (c + 0.5) / mh.shape[1], (r + 0.5) / mh.shape[0]
        assert px <= x1 and py <= y1, (f["title"], px, py, x1, y1)
        assert "fixed_location" in f["evidence"]["reasons"]
    # the clusters hold the watermarked validation images, not the clean ones
    members = set(s.table["path"][np.isin(s.table["cluster"].fillna(-1).to_numpy(),
                                          [f["cluster"] for f in hans])])
    marked = set(wm["val_paths"])
    assert len(members & marked) >= 0.9 * len(members)


def test_compare_the_shortcut_model_against_the_unbiased_one(biased_scan, unbiased_scan, biased,
                                                             tmp_path):
    # pre-release review: the unbiased model in production, the shortcut model as candidate,
    # on the same validation images (the val split does not depend on the training bias)
    from typer.testing import CliRunner

    from biasscope.cli import app

    truth = biased[2]
    c = biasscope.compare(unbiased_scan, biased_scan)
    new = {(f["kind"], f["class"]) for f in c.result["findings"]["new"]}
    print("\nnew findings:", sorted(new))
    for cls in truth["biased_classes"]:
        assert ("spurious_feature", cls) in new, new
    flips = c.result["flips"]
    assert flips["right_to_wrong"]["count"] > flips["wrong_to_right"]["count"], flips
    assert c.verdict == "regression"
    runner = CliRunner()
    r = runner.invoke(app, ["compare", str(unbiased_scan.path), str(biased_scan.path),
                            "--out", str(tmp_path / "cmp"), "--fail-on", "regressed"])
    assert r.exit_code == 1, r.output
    assert (tmp_path / "cmp" / "compare.json").is_file()
    # a scan compared with itself is clean
    same = biasscope.compare(biased_scan, biased_scan)
    assert same.result["findings"]["new"] == [] and same.result["findings"]["worse"] == []
    assert same.result["flips"]["right_to_wrong"]["count"] == 0
    assert same.result["flips"]["wrong_to_right"]["count"] == 0
    r = runner.invoke(app, ["compare", str(biased_scan.path), str(biased_scan.path),
                            "--out", str(tmp_path / "self"), "--fail-on", "regressed"])
    assert r.exit_code == 0, r.output
