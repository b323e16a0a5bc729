"""biasscope.compare: two stored scans without a model (``make_synthetic_scan``), the candidate
edited to plant known differences; the statistics on small hand-computed cases."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from biasscope.cli import app
from biasscope.compare import _centres, compare, mcnemar_exact, paired_bootstrap, parse_gates, shown_classes
from biasscope.errors import BiasscopeError
from biasscope.store import load, write_json, write_table
from test_report import make_synthetic_scan

runner = CliRunner()
ALL_GATES = ["regressed", "new:spurious_background", "delta.accuracy<-0.01", "delta.worst_group_acc<-0.02",
             "delta.inside_frac[class_00]<-0.05"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_synthetic_scan(tmp_path_factory.mktemp("base"), 60, n_classes=3)


def variant(base: Path, dest: Path, *, table=None, findings=None, analysis=None, meta=None, heat=None) -> Path:
    """A copy of the scan ``base`` at ``dest`` with its table, findings, analysis, meta or
    heatmaps passed through the given edit functions."""
    shutil.copytree(base, dest)
    s = load(dest)
    if table is not None:
        write_table(dest, table(s.table.copy()))
    if findings is not None:
        write_json(dest / "findings.json", findings([dict(f) for f in s.findings]))
    if analysis is not None:
        write_json(dest / "analysis.json", analysis(json.loads(json.dumps(s.analysis))))
    if meta is not None:
        write_json(dest / "meta.json", meta(dict(s.meta)))
    if heat is not None:
        h = heat(np.array(s.heatmaps))
        del s
        for name in ("heatmaps.npy", "heatmaps_true.npy"):
            np.save(dest / name, h.astype(np.float16))
    return dest


def flip_right_to_wrong(cls: str, k: int):
    """Edit: the first ``k`` correctly predicted images of ``cls`` become wrong."""
    def edit(t: pd.DataFrame) -> pd.DataFrame:
        rows = t.index[(t["label"] == cls) & t["correct"]][:k]
        assert len(rows) == k
        t.loc[rows, "correct"] = False
        t.loc[rows, "pred"] = "class_01" if cls != "class_01" else "class_02"
        return t
    return edit


def one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for frag in fragments:
        assert frag in lines[0], r.output


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def test_mcnemar_exact_on_hand_computed_cases():
    assert mcnemar_exact(8, 0) == pytest.approx(2 * 0.5 ** 8)
    assert mcnemar_exact(0, 8) == pytest.approx(2 * 0.5 ** 8)
    # 3 vs 5 of 8: P(X <= 3) + P(X >= 5) = 2 * (1 + 8 + 28 + 56) / 256
    assert mcnemar_exact(3, 5) == pytest.approx(186 / 256)
    assert mcnemar_exact(4, 4) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(BiasscopeError):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_ci_contains_the_true_delta_and_is_seeded():
    rng = np.random.default_rng(1)
    b = rng.normal(0.5, 0.2, 400)
    c = b + rng.normal(0.1, 0.1, 400)  # true mean delta 0.1
    r = paired_bootstrap(b, c)
    assert r["n"] == 400 and r["delta"] == pytest.approx(c.mean() - b.mean())
    lo, hi = r["ci"]
    assert lo < 0.1 < hi and hi - lo < 0.05  # paired: the CI is that of the differences (sd 0.1)
    assert paired_bootstrap(b, c) == r
    # a constant difference has a degenerate CI; undefined pairs are left out
    r = paired_bootstrap([0.0, 1.0, np.nan, 0.5], [0.2, 1.2, 0.3, np.nan])
    assert r["n"] == 2 and r["delta"] == pytest.approx(0.2) and r["ci"] == pytest.approx([0.2, 0.2])
    assert paired_bootstrap([np.nan], [1.0]) is None


# ----------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------


def test_a_scan_compared_with_itself_is_clean(base, tmp_path):
    cmp = compare(base, base, fail_on=ALL_GATES)
    r = cmp.result
    assert r["n_paired"] == 60 and r["warnings"] == []
    assert r["flips"]["right_to_wrong"]["count"] == 0 and r["flips"]["wrong_to_right"]["count"] == 0
    fd = r["findings"]
    assert len(fd["unchanged"]) == len(load(base).findings) > 0
    assert not (fd["new"] or fd["resolved"] or fd["worse"] or fd["better"])
    assert [g["tripped"] for g in r["gates"]] == [False] * len(ALL_GATES)
    assert r["verdict"]["status"] == "no regression"
    for row in [*r["per_class"].values(), r["overall"]]:
        assert row["delta_accuracy"] == 0 and row["p_value"] == 1.0 and row["inside_frac"]["delta"] == 0
    assert r["overall"]["worst_group_acc"]["delta"] == 0
    assert all(a["mean_delta_inside_frac"] == 0 and a["share_moved_off"] == 0 for a in r["attention_shift"].values())
    res = runner.invoke(app, ["compare", str(base), str(base), "--out", str(tmp_path / "o"),
                              *sum((["--fail-on", g] for g in ALL_GATES), [])])
    assert res.exit_code == 0, res.output
    assert "no regression" in res.output
    assert json.loads((tmp_path / "o" / "compare.json").read_text()) == r


def test_planted_flips_counted_per_class_with_paths_and_mcnemar(base, tmp_path):
    cand = variant(base, tmp_path / "cand", table=flip_right_to_wrong("class_00", 8))
    t = load(cand).table
    flipped = sorted(t["path"][(t["label"] == "class_00") & ~t["correct"]
                               & load(base).table["correct"]].tolist())
    r = compare(base, cand, fail_on=["regressed", "delta.accuracy<-0.01", "delta.accuracy[class_02]<-0.01"]).result
    f = r["flips"]
    assert f["right_to_wrong"]["count"] == 8 and f["wrong_to_right"]["count"] == 0
    assert sorted(f["per_class"]["class_00"]["right_to_wrong"]["paths"]) == flipped
    assert f["per_class"]["class_01"]["right_to_wrong"]["count"] == 0
    row = r["per_class"]["class_00"]
    assert row["delta_accuracy"] == pytest.approx(-8 / 20)
    assert row["p_value"] == pytest.approx(2 * 0.5 ** 8)
    lo, hi = row["delta_accuracy_ci"]
    assert lo <= -8 / 20 <= hi < 0
    assert r["per_class"]["class_01"]["p_value"] == 1.0
    assert [g["tripped"] for g in r["gates"]] == [True, True, False]
    assert "class_00 accuracy" in r["gates"][0]["detail"]
    assert r["verdict"]["status"] == "regression"
    # deterministic: the same scans give the same result
    assert compare(base, cand, fail_on=["regressed"]).result["per_class"] == compare(base, cand).result["per_class"]


def test_findings_diff_buckets_and_finding_gates(base, tmp_path):
    fs = sorted(load(base).findings, key=lambda f: -f["severity"])
    assert len(fs) >= 5
    gone, up, down, same = fs[0], fs[1], fs[2], fs[3]

    def edit(found):
        out = []
        for f in found:
            if f["id"] == gone["id"]:
                continue
            f = dict(f)
            if f["id"] == up["id"]:
                f["severity"] = min(1.0, f["severity"] + 0.2)
            elif f["id"] == down["id"]:
                f["severity"] = f["severity"] - 0.15
            elif f["id"] == same["id"]:
                f["severity"] = f["severity"] + 0.05
            out.append(f)
        out.append({"id": "spurious_background:class_01", "kind": "spurious_background", "scope": "class",
                    "class": "class_01", "cluster": None, "group": None, "severity": 0.8,
                    "title": "<b>planted</b>", "evidence": {}, "examples": []})
        return out

    cand = variant(base, tmp_path / "cand", findings=edit)
    r = compare(base, cand, fail_on=["new:spurious_background", "new:label_issue", "regressed"]).result
    fd = r["findings"]
    assert [(e["kind"], e["class"], e["candidate_severity"]) for e in fd["new"]] == [
        ("spurious_background", "class_01", 0.8)]
    assert fd["new"][0]["baseline_severity"] is None and fd["new"][0]["candidate_title"] == "<b>planted</b>"
    assert [e["baseline_id"] for e in fd["resolved"]] == [gone["id"]]
    assert fd["resolved"][0]["candidate_severity"] is None
    assert [e["baseline_id"] for e in fd["worse"]] == [up["id"]]
    assert [e["baseline_id"] for e in fd["better"]] == [down["id"]]
    assert same["id"] in [e["baseline_id"] for e in fd["unchanged"]]
    assert len(fd["unchanged"]) == len(fs) - 3
    assert fd["worse"][0]["baseline_severity"] == pytest.approx(up["severity"])
    assert [g["tripped"] for g in r["gates"]] == [True, False, True]
    assert "new spurious_background finding on class_01 at 0.80" in r["gates"][2]["detail"]


def test_regressed_ignores_new_findings_below_0_4(base, tmp_path):
    def edit(found):
        return found + [{"id": "x", "kind": "off_object_attention", "scope": "class", "class": "class_02",
                         "cluster": 7, "group": None, "severity": 0.3, "title": "weak", "evidence": {}}]

    r = compare(base, variant(base, tmp_path / "cand", findings=edit), fail_on=["regressed"]).result
    assert len(r["findings"]["new"]) == 1 and not r["gates"][0]["tripped"]
    assert r["verdict"]["status"] == "review"


def test_inside_frac_gate_and_attention_shift_with_masks(base, tmp_path):
    def edit(t):
        rows = t.index[t["label"] == "class_01"]
        t.loc[rows, "inside_frac"] = (t.loc[rows, "inside_frac"] - 0.1).clip(lower=0)
        t.loc[rows[:5], "inside_frac"] = -1.0  # dropped by far more than 0.2 (an impossible value is fine here)
        return t

    cand = variant(base, tmp_path / "cand", table=edit)
    r = compare(base, cand, fail_on=["delta.inside_frac[class_01]<-0.05", "delta.inside_frac[class_00]<-0.05",
                                     "delta.inside_frac<=-0.5"]).result
    assert [g["tripped"] for g in r["gates"]] == [True, False, False]
    a = r["attention_shift"]
    assert a["class_01"]["method"] == "inside_frac" and a["class_01"]["mean_delta_inside_frac"] < -0.05
    assert a["class_01"]["share_moved_off"] == pytest.approx(5 / 20)
    assert a["class_00"]["share_moved_off"] == 0
    assert r["per_class"]["class_01"]["inside_frac"]["delta"] == pytest.approx(a["class_01"]["mean_delta_inside_frac"])


def test_attention_shift_without_masks_uses_the_cam_centre(base, tmp_path):
    def no_masks(t):
        for c in ("inside_frac", "mask_frac", "lift", "pointing_hit", "energy_inside"):
            t[c] = np.nan
        return t

    b = variant(base, tmp_path / "b", table=no_masks)
    labels = load(b).table["label"].to_numpy()

    def move(h):  # class_02's CAMs: a blob at the far left for the baseline's far right
        h[labels == "class_02"] = 0.0
        h[labels == "class_02", 3, 6] = 1.0
        return h

    def left(h):
        h[labels == "class_02"] = 0.0
        h[labels == "class_02", 3, 0] = 1.0
        return h

    b = variant(b, tmp_path / "b2", heat=move)
    c = variant(b, tmp_path / "c", heat=left)
    r = compare(b, c, fail_on=["delta.inside_frac[class_02]<-0.05"]).result
    a = r["attention_shift"]
    assert a["class_02"]["method"] == "cam_centre" and a["class_02"]["mean_delta_inside_frac"] is None
    assert a["class_02"]["share_moved_off"] == 1.0
    assert a["class_02"]["mean_centre_shift"] == pytest.approx(6 / 7, abs=1e-3)
    assert a["class_00"]["share_moved_off"] == 0
    assert r["per_class"]["class_02"]["inside_frac"] is None
    assert not r["gates"][0]["tripped"] and "not available" in r["gates"][0]["detail"]
    json.dumps(r, allow_nan=False)  # strict JSON: every undefined figure is null
    one_sided = compare(base, b).result
    assert any("only one scan has masks" in w for w in one_sided["warnings"])
    assert one_sided["overall"]["inside_frac"] is None and one_sided["attention_shift"]["class_00"]["method"] == "cam_centre"
    json.dumps(one_sided, allow_nan=False)


def test_worst_group_gate(base, tmp_path):
    def edit(t):
        rows = t.index[(t["label"] == "class_02") & (t["background"] == "indoor")]
        t.loc[rows, "correct"] = False
        return t

    r = compare(base, variant(base, tmp_path / "cand", table=edit),
                fail_on=["delta.worst_group_acc<-0.02", "delta.worst_group_acc<-0.9"]).result
    wg = r["overall"]["worst_group_acc"]
    assert wg["candidate"] == 0 and wg["delta"] == pytest.approx(-wg["baseline"])
    assert wg["candidate_group"]["value"] == "indoor"
    assert [g["tripped"] for g in r["gates"]] == [True, wg["delta"] < -0.9]


def test_cannot_write_is_a_one_line_error(base, tmp_path):
    (tmp_path / "f").write_text("x")
    one_line_error(runner.invoke(app, ["compare", str(base), str(base), "--out", str(tmp_path / "o"),
                                       "--markdown", str(tmp_path / "f" / "s.md")]), "cannot write")
    assert compare(base, base, fail_on="regressed").result["gates"][0]["expr"] == "regressed"  # one string


def test_operators(base):
    r = compare(base, base, fail_on=["delta.accuracy>=0", "delta.accuracy>0", "delta.lift<=0",
                                     "delta.pointing_hit[class_02]<0"]).result
    assert [g["tripped"] for g in r["gates"]] == [True, False, True, False]
    assert r["verdict"] == {"status": "regression", "line": "gate delta.accuracy>=0, delta.lift<=0 tripped"}


def test_background_test_deltas_where_both_scans_have_them(base, tmp_path):
    def cf(gap, rate):
        def edit(a):
            a["counterfactuals"] = {"classes": {"class_00": {"bg_gap": gap, "only_bg_rate": rate}}}
            return a
        return edit

    b = variant(base, tmp_path / "b", analysis=cf(0.1, 0.2))
    c = variant(base, tmp_path / "c", analysis=cf(0.4, 0.5))
    r = compare(b, c, fail_on=["delta.bg_gap[class_00]>0.2", "delta.bg_gap[class_01]>0.2"]).result
    row = r["per_class"]["class_00"]
    assert row["bg_gap"] == pytest.approx({"baseline": 0.1, "candidate": 0.4, "delta": 0.3})
    assert row["only_bg_rate"]["delta"] == pytest.approx(0.3)
    assert r["per_class"]["class_01"]["bg_gap"] is None
    assert [g["tripped"] for g in r["gates"]] == [True, False]
    assert compare(base, base).result["per_class"]["class_00"]["bg_gap"] is None  # no background tests run


def test_partial_overlap_compares_the_intersection_with_a_warning(base, tmp_path):
    keep = np.arange(60) >= 10
    cand = variant(base, tmp_path / "cand", table=lambda t: t[keep].reset_index(drop=True),
                   heat=lambda h: h[keep])
    cmp = compare(base, cand)
    assert cmp.result["n_paired"] == 50
    assert any("partial overlap" in w and "10 only in the baseline" in w for w in cmp.result["warnings"])
    assert cmp.result["flips"]["right_to_wrong"]["count"] == 0
    res = runner.invoke(app, ["compare", str(base), str(cand), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "partial overlap" in res.output


# ----------------------------------------------------------------------------------------------
# bad input and gates: one line, exit 2, before any work
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, fragment", [
    ("delta.foo<1", "unknown figure 'foo'"),
    ("new:nonsense", "unknown finding kind 'nonsense'"),
    ("delta.accuracy[nope]<0", "unknown class 'nope'"),
    ("delta.worst_group_acc[class_00]<0", "no per-class value"),
    ("accuracy<0.9", "malformed"),
    ("delta.accuracy==0", "malformed"),
])
def test_unknown_or_malformed_gate_is_a_one_line_error(base, tmp_path, gate, fragment):
    one_line_error(runner.invoke(app, ["compare", str(base), str(base), "--out", str(tmp_path / "o"),
                                       "--fail-on", gate]), fragment)
    assert not (tmp_path / "o").exists()


def test_bad_gate_fails_before_reading_the_scans(tmp_path):
    one_line_error(runner.invoke(app, ["compare", str(tmp_path / "nope1"), str(tmp_path / "nope2"),
                                       "--fail-on", "delta.foo<1"]), "unknown figure")
    with pytest.raises(BiasscopeError, match="malformed"):
        parse_gates(["regressed", "regresed"])


def test_no_overlap_different_classes_not_a_scan_unfinished(base, tmp_path):
    moved = variant(base, tmp_path / "moved", table=lambda t: t.assign(path="elsewhere/" + t["path"]))
    one_line_error(runner.invoke(app, ["compare", str(base), str(moved)]), "no image in common")
    other = variant(base, tmp_path / "other", meta=lambda m: {**m, "classes": ["class_00", "class_01", "cat"]})
    one_line_error(runner.invoke(app, ["compare", str(base), str(other)]), "different classes", "'cat'")
    (tmp_path / "junk").mkdir()
    one_line_error(runner.invoke(app, ["compare", str(base), str(tmp_path / "junk")]), "not a biasscope scan")
    (tmp_path / "file.keras").write_bytes(b"PK\x03\x04 not a scan")
    one_line_error(runner.invoke(app, ["compare", str(tmp_path / "file.keras"), str(base)]), "not a biasscope scan")
    running = variant(base, tmp_path / "running", meta=lambda m: {**m, "status": "running"})
    one_line_error(runner.invoke(app, ["compare", str(running), str(base)]), "not finished")
    out_file = tmp_path / "file"
    out_file.write_text("x")
    one_line_error(runner.invoke(app, ["compare", str(base), str(base), "--out", str(out_file)]), "is a file")


# ----------------------------------------------------------------------------------------------
# CI outputs
# ----------------------------------------------------------------------------------------------


def test_markdown_and_junit_written_and_parseable(base, tmp_path):
    cand = variant(base, tmp_path / "cand", table=flip_right_to_wrong("class_00", 8))
    md, xml = tmp_path / "summary.md", tmp_path / "gates.xml"
    res = runner.invoke(app, ["compare", str(base), str(cand), "--out", str(tmp_path / "o"),
                              "--fail-on", "regressed", "--fail-on", "delta.accuracy[class_01]<-0.01",
                              "--fail-on", "delta.accuracy<-0.01", "--markdown", str(md), "--junit", str(xml)])
    assert res.exit_code == 1, res.output
    assert "regression" in res.output and "TRIPPED" in res.output
    text = md.read_text()
    assert text.startswith("## biasscope compare: regression")
    assert "| class_00 |" in text and "8 right to wrong" in text and "`regressed` | **tripped**" in text
    root = ET.parse(xml).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["regressed", "delta.accuracy[class_01]<-0.01", "delta.accuracy<-0.01"]
    assert [c.find("failure") is not None for c in cases] == [True, False, True]
    assert root.get("tests") == "3" and root.get("failures") == "2"
    assert root.find("testsuite").get("failures") == "2"


def test_api_export(base):
    import biasscope

    cmp = biasscope.compare(base, load(base))
    assert isinstance(cmp, biasscope.Comparison) and cmp.verdict == "no regression" and not cmp.tripped


# ----------------------------------------------------------------------------------------------
# compare.html
# ----------------------------------------------------------------------------------------------

XSS_CLASS = "<img src=x onerror=alert(1)>"
XSS_FILE = '"><img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def hostile(base, tmp_path_factory) -> tuple[Path, Path]:
    """The base scan with class_00 renamed to markup and its paths made hostile; and a
    candidate where 4 of its images flipped to wrong."""
    root = tmp_path_factory.mktemp("hostile")

    def names(t):
        t = t.replace({"label": {"class_00": XSS_CLASS}, "pred": {"class_00": XSS_CLASS}})
        t["path"] = [XSS_FILE + p if lab == XSS_CLASS else p for p, lab in zip(t["path"], t["label"])]
        return t

    def found(fs):
        return [{**f, "class": XSS_CLASS if f.get("class") == "class_00" else f.get("class"),
                 "title": str(f.get("title")).replace("class_00", XSS_CLASS)} for f in fs]

    b = variant(base, root / "b", table=names, findings=found,
                meta=lambda m: {**m, "classes": [XSS_CLASS, "class_01", "class_02"]})
    c = variant(b, root / "c", table=flip_right_to_wrong(XSS_CLASS, 4))
    return b, c


def test_compare_html_is_self_contained_and_escapes_user_strings(hostile, tmp_path):
    b, c = hostile
    res = runner.invoke(app, ["compare", str(b), str(c), "--out", str(tmp_path / "o"), "--fail-on", "regressed"])
    assert res.exit_code == 0, res.output  # 4 of 20 flipped: p = 0.125, not significant
    html = (tmp_path / "o" / "compare.html").read_text()
    assert XSS_CLASS not in html
    assert XSS_FILE not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown as text by Jinja autoescape
    assert html.count("<script>") == 2 and "innerHTML" not in html.split("<script>")[-1]
    assert "http://" not in html.split("<script>")[0] and "https://" not in html.split("<script>")[0]
    r = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert r["flips"]["per_class"][XSS_CLASS]["right_to_wrong"]["count"] == 4
    assert runner.invoke(app, ["compare", str(b), str(c), "--out", str(tmp_path / "p"), "--no-html"]).exit_code == 0
    assert not (tmp_path / "p" / "compare.html").exists()


def test_compare_html_in_chromium(hostile, tmp_path):
    import os

    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    b, c = hostile
    compare(b, c).write(tmp_path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            errors, dialogs = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto((tmp_path / "compare.html").resolve().as_uri())
            page.wait_for_selector("#delta-chart .main-svg", timeout=30000)
            page.select_option("#flip-class", index=2)  # the hostile class's right-to-wrong list
            items = page.eval_on_selector_all("#flip-list li", "els => els.map(e => e.textContent)")
            assert len(items) == 4 and all(i.startswith(XSS_FILE) for i in items)
            assert page.eval_on_selector_all("#flip-list img, #classes img, #findings img", "els => els.length") == 0
            page.click("#flip-list li:nth-child(2) button")
            view = page.eval_on_selector_all("#flip-view img", "els => els.map(e => e.src.slice(0, 11))")
            assert view == ["data:image/", "data:image/"]
            caps = page.eval_on_selector_all("#flip-view figcaption", "els => els.map(e => e.textContent)")
            assert caps == ["baseline: predicted " + XSS_CLASS, "candidate: predicted class_01"]
            assert page.text_content("#flip-view .path") == items[1] + " (label " + XSS_CLASS + ")"
            assert page.evaluate("window.__pwned") is None
            ticks = page.eval_on_selector_all("#delta-chart .xtick text", "els => els.map(e => e.textContent)")
            assert XSS_CLASS in ticks
            assert errors == [] and dialogs == []
        finally:
            browser.close()


def test_compare_html_flipped_images_carry_both_cams(base, tmp_path):
    cand = variant(base, tmp_path / "cand", table=flip_right_to_wrong("class_02", 3))
    cmp = compare(base, cand)
    from biasscope.report.compare import _flip_images

    images, index = _flip_images(cmp.result, cmp.baseline, cmp.candidate)
    assert len(images) == 3 and set(index) == set(cmp.result["flips"]["right_to_wrong"]["paths"])
    # the images exist under the scan's data folder: CAM overlays on them (JPEG), one per model
    assert all(im["baseline"].startswith("data:image/jpeg") and im["candidate"].startswith("data:image/jpeg")
               for im in images)
    assert {im["candidate_pred"] for im in images} == {"class_01"} and {im["label"] for im in images} == {"class_02"}
    cmp.write(tmp_path / "o")
    assert (tmp_path / "o" / "compare.html").read_text().count("data:image/jpeg") >= 6


def test_compare_needs_no_tensorflow(base, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from biasscope.cli import main; sys.argv = ['biasscope', 'compare', sys.argv[1], "
            "sys.argv[1], '--out', sys.argv[2]]\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    r = subprocess.run([sys.executable, "-c", code, str(base), str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "compare.html").is_file()


def test_cam_centres_are_resolution_free():
    h7 = np.zeros((2, 7, 7))
    h7[0, 3, 6] = 1.0  # the centre of the right-most column
    h14 = np.zeros((2, 14, 14))
    h14[0, 6:8, 12:14] = 1.0  # the same place at twice the resolution
    c7, c14 = _centres(h7), _centres(h14)
    assert c7[0] == pytest.approx([0.5, 13 / 14]) and c14[0] == pytest.approx(c7[0])
    assert np.isnan(c7[1]).all()  # an all-zero CAM has no centre


def test_many_classes_shown_worst_first():
    per = {f"c{i}": {"delta_accuracy": -i / 100} for i in range(30)}
    per["c_none"] = {"delta_accuracy": None}
    shown = shown_classes({"per_class": per})
    assert [c for c, _ in shown][:3] == ["c29", "c28", "c27"] and len(shown) == 20
