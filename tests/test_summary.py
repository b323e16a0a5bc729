"""biasscope.summary: headline figures and --fail-on gates."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from biasscope.errors import BiasscopeError
from biasscope.findings import REGISTRY, Finding
from biasscope.summary import SHORTCUT_KINDS, evaluate_gates, summarise, validate_gates, verdict


def table(attrs=True, masks=True):
    # a: 8/10 right (grass 5/5, sand 3/5); b: 9/10 right (grass 4/5, sand 5/5).
    t = pd.DataFrame({
        "path": [f"{i}.png" for i in range(20)],
        "label": ["a"] * 10 + ["b"] * 10,
        "correct": [True] * 5 + [True, True, True, False, False] + [True, True, True, True, False] + [True] * 5,
        "inside_frac": np.linspace(0.1, 0.9, 20) if masks else np.nan,
    })
    if attrs:
        t["background"] = (["grass"] * 5 + ["sand"] * 5) * 2
    return t


def f(kind, sev, i=0):
    return Finding(id=f"{kind}/{i}", kind=kind, scope="class", severity=sev, title="t", class_="a")


FINDINGS = [f("spurious_background", 0.82), f("misclassified", 0.7, 1), f("misclassified", 0.4, 2),
            f("label_issue", 0.39, 3), f("group_gap", 0.0, 4)]


def test_summary_figures():
    s = summarise(table(), FINDINGS, {"attributes": ["background"]})
    json.dumps(s, allow_nan=False)
    assert s["n"] == 20 and s["n_classes"] == 2
    assert s["accuracy"] == pytest.approx(17 / 20)
    assert s["worst_group_acc"] == pytest.approx(0.6)
    assert s["worst_group"] == {"class": "a", "attribute": "background", "value": "sand", "n": 5}
    assert s["mean_inside_frac"] == pytest.approx(0.5) and s["n_with_mask"] == 20
    assert s["n_findings"] == 5 and s["max_severity"] == pytest.approx(0.82)
    assert s["findings_by_severity"] == {"high": 2, "medium": 1, "low": 2}  # 0.7 is high, 0.4 medium
    assert s["findings_by_kind"]["misclassified"] == 2
    assert set(REGISTRY) <= set(s["findings_by_kind"])
    assert s["findings_by_kind"]["clever_hans_cluster"] == 0


def test_summary_without_attributes_or_masks_and_from_dicts():
    t = table(attrs=False, masks=False)
    s = summarise(t, [x.to_dict() for x in FINDINGS], {})
    assert s["worst_group_acc"] == pytest.approx(0.8)  # per-class minimum
    assert s["worst_group"] == {"class": "a", "n": 10}
    assert s["mean_inside_frac"] is None and s["n_with_mask"] == 0
    assert s == summarise(t, FINDINGS, None)  # Finding objects and stored dicts agree
    empty = summarise(t.iloc[:0], [], {})
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["worst_group_acc"] is None


def test_all_zero_heatmaps_keep_the_mask_count_and_say_so():
    t = table(attrs=False)
    t["mask_frac"] = 0.2
    t["cam_max"] = 0.3
    assert summarise(t, [], {})["heatmaps_all_zero"] is False
    t["inside_frac"], t["cam_max"] = np.nan, 0.0  # zero CAMs: no inside share, masks still there
    s = summarise(t, [], {})
    assert s["heatmaps_all_zero"] is True and s["n_with_mask"] == 20 and s["mean_inside_frac"] is None
    assert summarise(t.iloc[:0], [], {})["heatmaps_all_zero"] is False


def test_attributes_are_inferred_when_the_analysis_does_not_name_them():
    s = summarise(table(), [], {})
    assert s["worst_group_acc"] == pytest.approx(0.6)


@pytest.fixture
def summary():
    return summarise(table(), FINDINGS, {"attributes": ["background"]})


@pytest.mark.parametrize("expr, tripped", [
    ("spurious_background", True),
    ("clever_hans_cluster", False),
    ("severity>=0.7", True),
    ("severity>0.82", False),
    ("severity >= 0.82", True),
    ("worst_group_acc<0.8", True),
    ("worst_group_acc<0.6", False),
    ("worst_group_acc<=0.6", True),
    ("accuracy<0.9", True),
    ("accuracy>=0.9", False),
    ("accuracy==0.85", True),
    ("accuracy!=0.85", False),
    ("n_findings>4", True),
    ("misclassified>=2", True),
    ("misclassified>2", False),
    ("label_issue==1", True),
    ("mean_inside_frac<.5", False),
    ("max_severity>=8.2e-1", True),
])
def test_gates(summary, expr, tripped):
    (g,) = evaluate_gates([expr], summary, FINDINGS)
    assert g["expr"] == expr and g["tripped"] is tripped and g["detail"]


def test_gate_details_say_what_tripped(summary):
    kind, sev, wga = evaluate_gates(["spurious_background", "severity>=0.7", "worst_group_acc<0.8"],
                                    summary, [x.to_dict() for x in FINDINGS])
    assert "1 finding(s) of kind spurious_background" in kind["detail"]
    assert "2 finding(s) with severity >= 0.7" in sev["detail"] and "spurious_background/0" in sev["detail"]
    assert wga["detail"] == "worst_group_acc = 0.6 (< 0.8)"


def test_unavailable_figure_does_not_trip(summary):
    s = summarise(table(masks=False), FINDINGS, {})
    (g,) = evaluate_gates(["mean_inside_frac<0.5"], s, FINDINGS)
    assert g["tripped"] is False and "not available" in g["detail"]


@pytest.mark.parametrize("expr, match", [
    ("nonsense_kind", "unknown finding kind"),
    ("accuracy", "needs a comparison"),
    ("acuracy<0.9", "unknown name"),
    ("accuracy<", "malformed"),
    ("accuracy<<0.9", "malformed"),
    ("severity>=high", "malformed"),
    ("1<2", "malformed"),
    ("__import__('os').system('true')", "malformed"),
    ("accuracy<0.9 or True", "malformed"),
    ("", "malformed"),
])
def test_bad_expressions_raise_naming_the_expression(summary, expr, match):
    with pytest.raises(BiasscopeError, match=match) as e:
        evaluate_gates([expr], summary, FINDINGS)
    assert repr(expr) in str(e.value)


def test_no_gates_no_results(summary):
    assert evaluate_gates([], summary, FINDINGS) == []
    assert evaluate_gates(None, summary, FINDINGS) == []


def test_background_reliance_is_a_known_kind_even_without_its_detector(summary):
    (g,) = evaluate_gates(["background_reliance"], summary, FINDINGS)
    assert g["tripped"] is False and summary["findings_by_kind"]["background_reliance"] == 0


def test_end_to_end_from_a_scan_object(tmp_path):
    """analyse -> detectors -> summary -> gates on a Scan, everything JSON-serialisable."""
    from biasscope.analysis import analyse, fill_columns
    from biasscope.findings import Context, run_detectors
    from biasscope.store import Scan

    rng = np.random.default_rng(0)
    n = 60
    label = np.array(["a", "b"] * (n // 2), dtype=object)
    t = pd.DataFrame({
        "path": [f"{i}.png" for i in range(n)], "label": label, "label_idx": (label == "b").astype(int),
        "pred": label, "pred_idx": (label == "b").astype(int), "correct": True,
        "confidence": 0.9, "label_prob": 0.9,
        "top5": [np.array([int(x == "b"), int(x != "b")]) for x in label],
        "top5_prob": [np.array([0.9, 0.1])] * n,
        "inside_frac": np.where(label == "a", 0.2, 0.8) + rng.uniform(0, 0.05, n),
        "mask_frac": 0.3, "background": rng.choice(["x", "y"], n),
    })
    t["lift"] = t["inside_frac"] / t["mask_frac"]
    heat = rng.random((n, 7, 7)).astype(np.float16)
    scan = Scan(path=tmp_path, meta={"classes": ["a", "b"], "class_index": {"a": 0, "b": 1},
                                     "attributes": ["background"]},
                table=t, heatmaps=heat, heatmaps_true=heat)
    cols, an = analyse(scan.table, scan.heatmaps, classes=scan.classes, attributes=["background"],
                       projection="pca")
    scan.table = fill_columns(scan.table, cols)
    ctx = Context.from_scan(scan, an)
    assert ctx.classes == ["a", "b"] and ctx.attributes == ["background"]
    findings, status, flags = run_detectors(ctx)
    s = summarise(scan.table, findings, an)
    gates = evaluate_gates(["spurious_background", "severity>=0.7", "accuracy<0.9"], s, findings)
    json.dumps({"analysis": an, "findings": [f.to_dict() for f in findings], "summary": s,
                "status": status, "flags": flags, "gates": gates}, allow_nan=False)
    assert [f.class_ for f in findings if f.kind == "spurious_background"] == ["a"]
    assert [g["tripped"] for g in gates] == [True, True, False]


# ----------------------------------------------------------------------------------------------
# the verdict
# ----------------------------------------------------------------------------------------------


def g(kind, sev, i=0, cls="a", title=None, **evidence):
    return {"id": f"{kind}/{i}", "kind": kind, "scope": "class", "class": cls, "cluster": None,
            "group": None, "severity": sev, "title": title or f"{kind} {i}", "evidence": evidence,
            "examples": []}


def test_shortcut_kinds_are_exported():
    assert SHORTCUT_KINDS == ("spurious_feature", "clever_hans_cluster", "spurious_background",
                              "background_reliance")


def test_verdict_picks_unexplained_shortcut_findings_highest_first():
    fs = [g("misclassified", 0.95, 0),  # not a shortcut kind: never a root cause
          g("spurious_background", 0.6, 1, cls="seven"),
          g("spurious_feature", 0.9, 2, cls="seven",
            verdict_line="'seven' is predicted from the red corner patch"),
          g("background_reliance", 0.8, 3, cls="seven", explained_by=["spurious_feature/2"]),
          g("clever_hans_cluster", 0.7, 4, cls="one", explained_by=[]),  # empty: not explained
          g("clever_hans_cluster", 0.49, 5)]  # below the threshold
    v = verdict(fs)
    json.dumps(v, allow_nan=False)
    assert v["status"] == "shortcut"
    assert [r["id"] for r in v["root_causes"]] == ["spurious_feature/2", "clever_hans_cluster/4",
                                                   "spurious_background/1"]
    top = v["root_causes"][0]
    assert top == {"id": "spurious_feature/2", "kind": "spurious_feature", "class": "seven",
                   "severity": 0.9, "line": "'seven' is predicted from the red corner patch"}
    assert v["root_causes"][1]["line"] == "clever_hans_cluster 4"  # no verdict_line: the title
    assert v["n_explained"] == 1 and v["n_root_causes"] == 3
    assert v["line"] == ("3 root causes: 'seven' is predicted from the red corner patch; "
                         "clever_hans_cluster 4; spurious_background 1")


def test_verdict_threshold_and_cap():
    sevs = [0.3, 0.35, 0.4, 0.45, 0.49, 0.5, 0.55, 0.6, 0.65, 0.75]
    fs = [g("clever_hans_cluster", sev, i) for i, sev in enumerate(sevs)]
    v = verdict(fs)
    assert v["n_root_causes"] == 5 and len(v["root_causes"]) == 5  # 0.5 (inclusive) .. 0.75
    assert [r["severity"] for r in v["root_causes"]] == [0.75, 0.65, 0.6, 0.55, 0.5]
    assert not v["line"].endswith("more")
    v = verdict(fs, min_severity=0.4)
    assert v["n_root_causes"] == 8 and len(v["root_causes"]) == 5 and v["line"].endswith("; and 3 more")
    assert verdict(fs, min_severity=0.75)["n_root_causes"] == 1
    assert verdict(fs, min_severity=0.8)["status"] == "review"  # 0.75 >= 0.7 still asks for a look
    with pytest.raises(BiasscopeError, match="min_severity"):
        verdict(fs, min_severity=1.5)


def test_verdict_status_review_clean_and_empty():
    v = verdict([g("misclassified", 0.7), g("clever_hans_cluster", 0.4, 1)])
    assert v["status"] == "review" and v["root_causes"] == []
    assert v["line"].startswith("no shortcut found at severity >= 0.5") and "1 finding" in v["line"]
    # an explained shortcut finding is not a root cause, but its severity still asks for review
    v = verdict([g("spurious_background", 0.9, explained_by=["label_issue/7"])])
    assert v["status"] == "review" and v["n_explained"] == 1
    v = verdict([g("misclassified", 0.69), g("spurious_background", 0.2, 1)])
    assert v["status"] == "clean" and v["line"] == "no shortcut found at severity >= 0.5"
    assert verdict([]) == {"status": "clean", "line": "no shortcut found at severity >= 0.5",
                           "root_causes": [], "n_root_causes": 0, "n_explained": 0, "n_review": 0,
                           "min_severity": 0.5}


def test_verdict_reads_finding_objects_and_is_in_the_summary():
    v = verdict(FINDINGS)  # spurious_background 0.82, a Finding object
    assert v["status"] == "shortcut" and [r["id"] for r in v["root_causes"]] == ["spurious_background/0"]
    assert v["line"] == "1 root cause: t"
    s = summarise(table(), FINDINGS, {"attributes": ["background"]})
    assert s["verdict"] == v
    assert summarise(table(), [], {})["verdict"]["status"] == "clean"


@pytest.fixture
def registry_restored():
    """The registry as it was, in its order (the order detectors run in), after the test."""
    saved = dict(REGISTRY)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)


def test_spurious_feature_is_a_valid_gate_before_its_detector_exists(registry_restored):
    for name in [k for k, cls in REGISTRY.items() if cls.kind == "spurious_feature"]:
        del REGISTRY[name]  # as before its detector was registered
    summary = summarise(table(), FINDINGS, {"attributes": ["background"]})
    (gate,) = evaluate_gates(["spurious_feature"], summary, FINDINGS)
    assert gate["tripped"] is False and summary["findings_by_kind"]["spurious_feature"] == 0
    validate_gates(["spurious_feature", "spurious_feature>=1"])
    (gate,) = evaluate_gates(["spurious_feature"], summary, FINDINGS + [f("spurious_feature", 0.9, 9)])
    assert gate["tripped"] is True


def test_a_detector_registered_later_for_an_extra_kind_is_listed_once(monkeypatch):
    from biasscope import findings
    from biasscope.summary import _known_kinds

    class Fake(findings.Detector):
        name, kind, scope, description = "spurious_feature_v2", "spurious_feature", "class", "test"

        def run(self, ctx):  # pragma: no cover - never run
            return findings.DetectorResult()

    monkeypatch.setitem(REGISTRY, Fake.name, Fake)
    kinds = _known_kinds()
    assert kinds.count("spurious_feature") == 1 and kinds.count("background_reliance") == 1
    assert summarise(table(), [], {})["findings_by_kind"]["spurious_feature"] == 0
