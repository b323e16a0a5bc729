"""End to end on the shortcut zoo: findings name the class a shortcut helps, not its victims.

Every case of :mod:`biasscope.zoo` is built, its model trained (about half a minute each on 2
CPU cores; cached in ``datasets/generated/zoo/`` by the zoo version and the case's parameters)
and scanned with counterfactuals; the findings are checked against the case's ``truth.json``.
The thresholds of the detectors were validated on all of these cases together, none on one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

keras = pytest.importorskip("keras")

import biasscope  # noqa: E402
from biasscope import zoo  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / "datasets" / "generated" / "zoo"
SHORTCUT_KINDS = ("spurious_feature", "clever_hans_cluster", "spurious_background",
                  "background_reliance")
SHORTCUT_CASES = [n for n, c in zoo.ZOO.items() if c["shortcut"] is not None]
CLEAN_CASES = [n for n, c in zoo.ZOO.items() if c["shortcut"] is None]
FLIP_FREE = [n for n, c in zoo.ZOO.items() if c["flip_rate"] == 0]

_SCANS: dict = {}


def _case(name, tmp_path_factory):
    if name not in _SCANS:
        root = zoo.build_case(CACHE / name, name)
        model = zoo.train_case(root)
        truth = json.loads((root / "truth.json").read_text())
        scan = biasscope.scan(model, root / "val", out=tmp_path_factory.mktemp(f"zoo_{name}"),
                              report=False, progress=False)
        _SCANS[name] = (scan, truth)
    return _SCANS[name]


def _strong(scan, severity=0.5):
    """Shortcut findings at `severity` or more that no other finding explains."""
    return [f for f in scan.findings if f["kind"] in SHORTCUT_KINDS and f["severity"] >= severity
            and not f["evidence"].get("explained_by")]


def _describe(scan):
    return [(round(f["severity"], 2), f["kind"], f["class"], f["title"][:80]) for f in scan.findings[:8]]


@pytest.mark.parametrize("name", SHORTCUT_CASES)
def test_the_model_really_uses_its_shortcut(name, tmp_path_factory):
    _, truth = _case(name, tmp_path_factory)
    m = truth["measured"]
    print(f"\n{name}: {m['featured_rate']:.0%} of featured other-class images predicted "
          f"{truth['shortcut']['class']!r} vs {m['plain_rate']:.0%} without the feature")
    assert m["uses_shortcut"] and m["effect"] >= zoo.MIN_EFFECT, m


@pytest.mark.parametrize("name", SHORTCUT_CASES)
def test_the_planted_class_and_only_it_gets_a_shortcut_finding(name, tmp_path_factory):
    scan, truth = _case(name, tmp_path_factory)
    planted = set(truth["shortcut_classes"])
    strong = _strong(scan)
    print(f"\n{name}:", _describe(scan))
    assert {f["class"] for f in strong} == planted, _describe(scan)
    # the highest-ranked shortcut finding (explained or not) names the planted class
    top = next(f for f in scan.findings if f["kind"] in SHORTCUT_KINDS)
    assert top["class"] in planted, _describe(scan)
    # victims' findings are linked to the root cause and rank below it
    roots = {f["id"] for f in strong}
    for f in scan.findings:
        for r in f["evidence"].get("explained_by") or []:
            assert r in {g["id"] for g in scan.findings}
            assert f["severity"] < next(g["severity"] for g in scan.findings if g["id"] == r)
    # the verdict leads with the planted class
    v = scan.summary["verdict"]
    assert v["status"] == "shortcut" and v["root_causes"][0]["class"] in planted
    assert {r["id"] for r in v["root_causes"]} <= roots


@pytest.mark.parametrize("name", [n for n in SHORTCUT_CASES if zoo.ZOO[n]["masks"]])
def test_attractor_evidence_names_the_victims(name, tmp_path_factory):
    scan, truth = _case(name, tmp_path_factory)
    (sf,) = [f for f in scan.findings if f["kind"] == "spurious_feature"]
    ev = sf["evidence"]
    assert ev["attraction_ci"][0] > 0 and ev["rate_in"] > ev["rate_out"]
    assert set(ev["victims"]) <= set(truth["victim_classes"])
    assert sum(v["n_victims_original"] for v in ev["victims"].values()) >= 5
    # the background images it lists as most attracting carry the planted feature
    featured = set(truth["shortcut"]["val_paths"])
    top = ev["examples_backgrounds"][:5]
    assert np.mean([p in featured for p in top]) >= 0.8, top


def test_without_masks_the_mark_is_found_by_occlusion(tmp_path_factory):
    scan, truth = _case("corner_tag_nomask", tmp_path_factory)
    assert scan.analysis["counterfactuals"].get("skipped")
    (s,) = truth["shortcut_classes"]
    hans = [f for f in _strong(scan) if f["kind"] == "clever_hans_cluster" and f["class"] == s]
    assert hans, _describe(scan)
    occ = hans[0]["evidence"]["occlusion"]
    assert "occlusion" in hans[0]["evidence"]["reasons"]
    assert occ["changed_rate"] >= 0.8 and occ["control_changed_rate"] <= 0.2
    assert occ["repaired_share"] >= 0.5
    # the occluded spot is the mark's corner (top-right), at the heatmap's resolution
    cen = hans[0]["evidence"]["centroid"]
    sc = truth["shortcut"]
    assert abs(cen["x"] - (sc["x"] + sc["size"] / 2) / truth["canvas"]) < 0.15
    assert abs(cen["y"] - (sc["y"] + sc["size"] / 2) / truth["canvas"]) < 0.15


@pytest.mark.parametrize("name", CLEAN_CASES)
def test_clean_models_get_no_shortcut_finding(name, tmp_path_factory):
    scan, _ = _case(name, tmp_path_factory)
    assert _strong(scan) == [], _describe(scan)
    assert scan.summary["verdict"]["status"] != "shortcut"


@pytest.mark.parametrize("name", FLIP_FREE)
def test_label_issues_are_rare_without_flips(name, tmp_path_factory):
    scan, _ = _case(name, tmp_path_factory)
    flagged = int(sum("label_issue" in f for f in scan.table["flags"]))
    print(f"\n{name}: {flagged} of {len(scan.table)} flagged as label issues")
    assert flagged <= 0.02 * len(scan.table)


@pytest.mark.parametrize("name, precision, recall", [("clean_flips", 0.9, 0.9),
                                                     ("clean_flips_hard", 0.8, 0.65)])
def test_label_issues_recover_the_flips_on_clean_models(name, precision, recall, tmp_path_factory):
    scan, truth = _case(name, tmp_path_factory)
    flipped = {f["path"] for f in truth["flipped"]}
    flagged = set(scan.table["path"][np.array(["label_issue" in f for f in scan.table["flags"]])])
    hit = len(flagged & flipped)
    p, r = hit / max(len(flagged), 1), hit / len(flipped)
    print(f"\n{name}: {len(flagged)} flagged, {len(flipped)} flipped, precision {p:.2f}, recall {r:.2f}")
    assert p >= precision and r >= recall
