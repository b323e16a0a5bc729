"""biasscope.report: the HTML report, rendered from a stored scan and driven in headless Chromium.

Browser tests need ``/usr/bin/chromium`` (Debian package ``chromium``; ``.ci/run`` installs it)
and Playwright's Python API; they skip with the reason when either is missing. Playwright's own
browser download is never used.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from biasscope.errors import BiasscopeError
from biasscope.report import render_html, write_report
from biasscope.report.escape import plotly_text, script_json
from biasscope.report.thumbnails import choose_rows, colorize, mask_sources, outline
from biasscope.store import load

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_CLASS = "<img src=x onerror=alert(1)>"
XSS_FILE = '"><img src=x onerror="window.__pwned=1">'
XSS_FILE2 = "<!--<script>window.__pwned=2<\\script>\u2028&amp;"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _scan(data, tmp, name="scan", n_classes=3):
    """A real scan of ``data`` with the tiny CNN of conftest (TensorFlow only in this process)."""
    import biasscope
    from conftest import make_cnn

    model = tmp / f"{name}.keras"
    make_cnn(n_classes).save(model)
    return biasscope.scan(model, data, out=tmp / name, counterfactuals=False, progress=False,
                          batch_size=8)


def make_synthetic_scan(root: Path, n: int, *, n_classes: int = 10, size: int = 128, hw: int = 7,
                        seed: int = 0) -> Path:
    """A stored scan of ``n`` generated images without a model: textured JPEGs with a box
    object and its PNG mask, CAMs as blobs (on the object for most images, in a fixed corner for
    a "shortcut" share), metrics from :func:`biasscope.metrics.attention_metrics`, and the real
    analysis (PCA map), detectors and summary. Returns the scan directory."""
    from biasscope.analysis import analyse, fill_columns
    from biasscope.findings import Context, run_detectors
    from biasscope.metrics import attention_metrics, upsample_bilinear
    from biasscope.store import write_json, write_table
    from biasscope.summary import summarise

    rng = np.random.default_rng(seed)
    data, out = root / "data", root / "scan"
    out.mkdir(parents=True)
    classes = [f"class_{c:02d}" for c in range(n_classes)]
    label_idx = np.arange(n) % n_classes
    boxes = np.zeros((n, 4), np.int64)
    small = np.zeros((n, 32, 32), bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        c = classes[label_idx[i]]
        (data / "images" / c).mkdir(parents=True, exist_ok=True)
        (data / "masks" / c).mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 255, (size // 16, size // 16, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(smooth).resize((size, size), Image.BILINEAR), np.int16)
        img = img + rng.integers(-25, 25, img.shape)  # photo-like texture: hard for JPEG
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 5, size // 2, 2)
        m = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        img[m] = rng.integers(120, 255, 3)
        boxes[i] = (y0, x0, h, w)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(data / "images" / c / f"{i:06d}.jpg", quality=85)
        Image.fromarray((m * 255).astype(np.uint8)).save(data / "masks" / c / f"{i:06d}.png")
        # "> 0": PIL's bool arrays hold 0/255 bytes, which numpy sums as 255
        small[i] = np.asarray(Image.fromarray(m).resize((32, 32), Image.NEAREST)) > 0
    # CAMs: a blob on the object, or (shortcut) in the top-left corner
    shortcut = rng.random(n) < 0.2
    cy = np.where(shortcut, 0.5, (boxes[:, 0] + boxes[:, 2] / 2) / size * hw - 0.5)
    cx = np.where(shortcut, 0.5, (boxes[:, 1] + boxes[:, 3] / 2) / size * hw - 0.5)
    gy, gx = np.mgrid[:hw, :hw]
    heat = np.exp(-((gy[None] - cy[:, None, None]) ** 2 + (gx[None] - cx[:, None, None]) ** 2) / 2.0)
    heat = (heat + rng.uniform(0, 0.1, heat.shape)).astype(np.float32)
    heat /= heat.max(axis=(1, 2), keepdims=True)
    pred_idx = np.where(rng.random(n) < 0.8, label_idx, rng.integers(0, n_classes, n))
    pred_idx = np.where(shortcut & (rng.random(n) < 0.5), (label_idx + 1) % n_classes, pred_idx)
    probs = rng.dirichlet(np.ones(n_classes) * 0.3, n)
    probs[np.arange(n), pred_idx] += probs.max(axis=1) + 0.1
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :5]
    att = attention_metrics(upsample_bilinear(heat, (32, 32)), small)
    table = pd.DataFrame({
        "index": np.arange(n), "path": [f"images/{classes[label_idx[i]]}/{i:06d}.jpg" for i in range(n)],
        "label": [classes[i] for i in label_idx], "label_idx": label_idx.astype(np.int32),
        "pred": [classes[i] for i in pred_idx], "pred_idx": pred_idx.astype(np.int32),
        "correct": pred_idx == label_idx, "confidence": probs[np.arange(n), pred_idx],
        "label_prob": probs[np.arange(n), label_idx], "top5": list(top.astype(np.int32)),
        "top5_prob": list(np.take_along_axis(probs, top, 1).astype(np.float32)),
        **{k: np.asarray(v, np.float64) for k, v in att.items()},
        "cam_max": np.ones(n), "cam_true_max": np.ones(n),
        "background": rng.choice(["indoor", "outdoor", "studio"], n),
    })
    columns, info = analyse(table, heat, classes=classes, attributes=["background"], projection="pca")
    table = fill_columns(table, columns)
    ctx = Context(table=table, heatmaps=heat, heatmaps_true=heat, analysis=info, classes=classes,
                  attributes=["background"])
    findings, status, flags = run_detectors(ctx)
    table["flags"] = flags
    info["detectors"] = status
    info["counterfactuals"] = {"skipped": "not run"}
    found = [f.to_dict() for f in findings]
    np.save(out / "heatmaps.npy", heat.astype(np.float16))
    np.save(out / "heatmaps_true.npy", heat.astype(np.float16))
    write_table(out, table)
    write_json(out / "analysis.json", info)
    write_json(out / "findings.json", found)
    write_json(out / "summary.json", summarise(table, found, info))
    write_json(out / "meta.json", {
        "schema_version": 1, "status": "complete", "model": {"name": "synthetic", "path": None},
        "layer": "synthetic", "layer_shape": [hw, hw, 1], "method": "gradcam", "classes": classes,
        "class_index": {c: i for i, c in enumerate(classes)}, "data_root": str(data), "n_images": n,
        "attributes": ["background"], "options": {"seed": seed}, "versions": {}, "n_scanned": n,
        "skipped": [], "warnings": {}, "timings": {}})
    return out


def _browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    return sync_api


class Page:
    """A report opened in headless Chromium, recording errors and dialogs."""

    def __init__(self, pw, path: Path):
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": 1360, "height": 900})
        self.errors, self.dialogs = [], []
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)

        def on_dialog(d):
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", on_dialog)
        t0 = time.perf_counter()
        self.page.goto(Path(path).resolve().as_uri(), wait_until="commit")
        self.page.wait_for_selector(".main-svg", timeout=30000)
        self.first_figure_s = time.perf_counter() - t0  # wall clock, from the navigation request
        self.page.wait_for_function("window.__bsReportReady === true", timeout=60000)
        # in the page: navigation start -> first frame painted with a figure in it
        self.first_paint_s = self.page.evaluate("window.__bsFirstPaint") / 1000

    def missing_figures(self) -> list:
        return self.page.evaluate(
            "[...document.querySelectorAll('.fig[data-fig]')].filter(d => !d.querySelector('.main-svg'))"
            ".map(d => d.dataset.fig)")

    def close(self):
        self.browser.close()


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    """A real scan of 18 images (3 classes, masks, a background attribute via a manifest)."""
    from conftest import make_image_set

    tmp = tmp_path_factory.mktemp("report")
    data = make_image_set(tmp / "data", n_per_class=6)
    rows = sorted(str(p.relative_to(data)) for p in (data / "images").rglob("*.png"))
    pd.DataFrame({"path": rows, "label": [Path(r).parent.name for r in rows],
                  "mask": [r.replace("images/", "masks/", 1) for r in rows],
                  "background": ["plain", "busy"] * (len(rows) // 2)}).to_csv(data / "manifest.csv", index=False)
    return _scan(data, tmp)


@pytest.fixture(scope="module")
def small_report(small_scan):
    return write_report(small_scan)


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------


def test_script_json_cannot_end_the_script_element_and_round_trips():
    value = {"a": "</script><!--<script>", "b": "\u2028\u2029", "c": "&amp; <b>", "</script>": [1.5, None]}
    text = script_json(value)
    assert not re.search(r"<|>|&|\u2028|\u2029", text)
    assert json.loads(text) == value
    with pytest.raises(ValueError):
        script_json({"x": float("nan")})


def test_plotly_text_shows_tags_literally():
    assert plotly_text("<b>x</b> & y") == "&lt;b&gt;x&lt;/b&gt; &amp; y"


def test_colormap_and_outline():
    c = colorize(np.array([0.0, 0.5, 1.0]))
    assert c.shape == (3, 3)
    assert c[0].argmax() == 2 and c[2].argmax() == 0  # low = blue, high = red
    m = np.zeros((6, 6), bool)
    m[1:5, 1:5] = True
    edge = outline(m)
    assert edge.sum() == 12 and not edge[2:4, 2:4].any()
    assert outline(np.ones((3, 3), bool)).sum() == 8  # the frame closes an object cut by the border


def test_evidence_tables_join_lists_in_cells():
    from biasscope.report.build import _evidence_items

    items = _evidence_items({"images": [{"path": "a.png", "near": ["b.png", "c.png"], "p": 0.5}],
                             "views": ["object"]}, {"a.png": 3})
    table, views = items
    assert table["kind"] == "table" and table["columns"] == ["path", "near", "p"]
    cells = table["rows"][0]
    assert cells[0] == {"text": "a.png", "row": 3}
    assert cells[1]["text"] == "b.png, c.png"
    assert views == {"key": "views", "kind": "scalar", "text": "object"}


def test_thumbnail_cap_keeps_examples_clusters_and_flagged_first():
    n = 5000
    t = pd.DataFrame({"path": [f"p{i}" for i in range(n)], "confidence": np.linspace(0, 1, n),
                      "flags": [["misclassified"] if i % 3 == 0 else [] for i in range(n)]})
    findings = [{"examples": ["p1", "p2"]}]
    analysis = {"clusters": [{"examples": ["p4", "p5"]}]}
    rows = choose_rows(t, findings, analysis, max_thumbs=100)
    assert len(rows) == 100 and {1, 2, 4, 5} <= set(rows.tolist())
    flagged = [r for r in rows if r not in (1, 2, 4, 5)]
    assert all(r % 3 == 0 for r in flagged) and max(flagged) == 4998  # most confident first
    assert len(choose_rows(t.iloc[:50], [], {})) == 50  # small scans: every image


def test_masks_resolved_from_manifest_and_directory_layout(tmp_path):
    root = tmp_path / "d"
    (root / "masks" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "a" / "x.png")
    t = pd.DataFrame({"path": ["images/a/x.jpg", "images/a/y.jpg", "images/a/x.jpg"],
                      "inside_frac": [0.5, 0.5, np.nan]})
    src = mask_sources(t, {"data_root": str(root)})
    assert src[0].file == str(root / "masks" / "a" / "x.png")
    assert src[1] is None and src[2] is None  # missing file; no mask metrics
    pd.DataFrame({"path": ["images/a/y.jpg"], "label": ["a"], "mask": ["masks/a/x.png"]}).to_csv(
        root / "manifest.csv", index=False)
    src = mask_sources(t, {"data_root": str(root)})
    assert src[0] is None and src[1].file == str(root / "masks" / "a" / "x.png")
    assert mask_sources(t, {"data_root": str(root)}, rows=[0, 2]) == [None, None, None]  # only those
    t[["x0", "y0", "x1", "y1"]] = [[0, 0, 2, 2], [np.nan] * 4, [0, 0, 1, 1]]
    assert mask_sources(t, {"data_root": str(root)})[0].box == (0.0, 0.0, 2.0, 2.0)


# ----------------------------------------------------------------------------------------------
# rendering (no browser)
# ----------------------------------------------------------------------------------------------


def test_report_is_one_self_contained_file(small_scan, small_report):
    html = small_report.read_text()
    assert small_report == small_scan.path / "report.html"
    from plotly.offline import get_plotlyjs_version

    assert html.count(f"plotly.js v{get_plotlyjs_version()}") == 1  # the library, embedded once
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", html)  # nothing fetched
    for section in ("summary", "findings", "classes", "explorer", "clusters", "misclassifications",
                    "attention", "groups", "counterfactuals", "run"):
        assert f'<section id="{section}"' in html
    assert "Not run: the scan was made without the background-swap tests" in html


def test_scan_write_report_and_cli(small_scan, tmp_path):
    from typer.testing import CliRunner

    from biasscope.cli import app

    out = small_scan.write_report(tmp_path / "sub" / "r.html")
    assert out == tmp_path / "sub" / "r.html" and out.stat().st_size > 1_000_000
    r = CliRunner().invoke(app, ["report", str(small_scan.path), "--out", str(tmp_path / "c.html")])
    assert r.exit_code == 0, r.output
    assert f"report: {tmp_path / 'c.html'}" in r.output.replace("\n", "")
    (tmp_path / "not-a-scan").mkdir()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "not-a-scan")])
    assert r.exit_code == 2 and "not a biasscope scan" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_counterfactual_results_are_rendered_when_present(small_scan):
    scan = load(small_scan.path)
    ci = [0.1, 0.3]
    scan.analysis["counterfactuals"] = {"classes": {c: {
        "n": 6, "chance": 1 / 3, "only_bg_rate": 0.2, "only_bg_ci": ci, "orig_acc": 0.5,
        "mixed_rand_acc": 0.3, "bg_gap": 0.2, "bg_gap_ci": ci, "transplant_rate": 0.1,
        "transplant_ci": [0.0, 0.2], "only_fg_acc": 0.875, "only_fg_ci": [0.625, 1.0]}
        for c in scan.classes}}
    html = render_html(scan, thumbnails=False)
    assert "Mixed-Rand acc." in html and "[10.0%, 30.0%]" in html and '"counterfactuals"' in html
    assert "Only-FG acc.</th>" in html and "87.5% <span class=\"ci\">[62.5%, 100.0%]</span>" in html
    assert "BG-gap</th>" in html  # the per-class table gains the column
    assert "stratified sample" not in html  # no sample recorded: none claimed
    scan.analysis["counterfactuals"]["method"] = {"mixed_rand_sample": {
        "per_class": 1068, "n_objects": 4272, "stratified_by": ["label", "background"]}}
    html = render_html(scan, thumbnails=False)
    assert "stratified sample of at most 1,068 objects per class (4,272 in all, by label, background)" in html
    scan.analysis["counterfactuals"] = {"skipped": "no masks"}
    assert "Not run: no masks." in render_html(scan, thumbnails=False)


def test_report_without_analysis_or_findings(small_scan, tmp_path):
    scan = load(small_scan.path)
    scan.analysis, scan.findings, scan.summary = {}, [], {}
    scan.table["embed_x"] = np.nan
    html = render_html(scan, thumbnails=False)
    assert "No findings" in html and "No cluster analysis in this scan" in html


def test_report_without_masks_shows_entropy_instead(small_scan):
    scan = load(small_scan.path)
    for c in ("inside_frac", "mask_frac", "lift", "pointing_hit", "energy_inside"):
        scan.table[c] = np.nan
    scan.analysis, scan.summary = {}, {}
    html = render_html(scan, thumbnails=False)
    assert "No masks in this scan" in html and "cam_entropy by true class" in html
    assert '<option value="inside_frac">' not in html


@pytest.fixture(scope="module")
def stored_scan(tmp_path_factory):
    """A small stored scan without a model (60 generated images, 3 classes): fast."""
    return make_synthetic_scan(tmp_path_factory.mktemp("stored"), 60, n_classes=3, size=32)


def _hand_made_findings():
    def fd(i, kind, sev, cls, title, **evidence):
        return {"id": f"{kind}/class={cls}/{i}", "kind": kind, "scope": "class", "class": cls,
                "cluster": None, "group": None, "severity": sev, "title": title, "evidence": evidence,
                "examples": []}

    root = fd(0, "spurious_feature", 0.91, XSS_CLASS, f"a feature pulls predictions to {XSS_CLASS}",
              verdict_line=f"'{XSS_CLASS}' is predicted from a corner patch <b>x</b>")
    return [
        root,
        fd(1, "background_reliance", 0.85, XSS_CLASS, f"'{XSS_CLASS}' is predicted from backgrounds",
           explained_by=[root["id"]]),
        fd(2, "misclassified", 0.8, "class_01", "4 of 20 'class_01' images misclassified (20%)"),
        fd(3, "spurious_background", 0.6, "class_02", "'class_02' attends off the object"),
        fd(4, "label_issue", 0.3, "class_00", "2 image(s) labelled 'class_00' look like 'class_01'",
           explained_by=["no-such-finding"]),
    ]


def _section(html, name):
    start = html.index(f'<section id="{name}"')
    return html[start:html.index("</section>", start)]


def test_verdict_leads_the_summary_card_and_links_root_causes(stored_scan):
    from markupsafe import escape

    from biasscope.summary import verdict

    scan = load(stored_scan)
    scan.findings = _hand_made_findings()
    scan.summary["verdict"] = verdict(scan.findings)
    html = render_html(scan, thumbnails=False)
    assert XSS_CLASS not in html and "<b>x</b>" not in html  # escaped everywhere
    card = _section(html, "summary")
    assert card.index('id="verdict"') < card.index('class="kpis"')  # the verdict comes first
    v = card[card.index('id="verdict"'):card.index('class="kpis"')]
    assert '<span class="pill pill-high">shortcut</span>' in v and "2 root causes" in v
    line0 = escape(f"'{XSS_CLASS}' is predicted from a corner patch <b>x</b>")  # verdict_line
    line1 = escape("'class_02' attends off the object")  # no verdict_line: the title
    assert f'<a class="rc-link" href="#finding-0">{line0}</a>' in v
    assert f'<a class="rc-link" href="#finding-3">{line1}</a>' in v
    assert v.index(line0) < v.index(line1)  # highest severity first
    assert "background_reliance" not in v and "misclassified" not in v  # explained; not a shortcut
    assert "2 findings explained by another finding" in v
    # the anchors are the findings' sections; explained findings link to their root cause
    findings = _section(html, "findings")
    assert '<details class="finding band-high" id="finding-0"' in findings
    assert '<details class="finding band-medium" id="finding-3" data-band="medium" open>' in findings
    title0 = escape(f"a feature pulls predictions to {XSS_CLASS}")
    assert f'explained by: <a href="#finding-0">{title0}</a>' in findings
    assert "explained by: <span title=\"no finding with this id in the scan\">no-such-finding</span>" in findings
    assert findings.count('<span class="pill pill-high">root cause</span>') == 2
    assert "<dt>explained_by</dt>" not in findings  # shown as links, not as an evidence cell


def test_verdict_of_a_scan_without_one_and_of_a_clean_scan(stored_scan):
    scan = load(stored_scan)
    assert scan.summary["verdict"]["status"] in ("shortcut", "review", "clean")  # summarise wrote it
    scan.findings = _hand_made_findings()
    del scan.summary["verdict"]  # a scan from before the verdict: computed from its findings
    v = _section(render_html(scan, thumbnails=False), "summary")
    assert "2 root causes" in v and 'href="#finding-0"' in v
    scan.findings = [f for f in _hand_made_findings() if f["kind"] == "label_issue"]
    scan.summary = {}
    v = _section(render_html(scan, thumbnails=False), "summary")
    assert '<span class="pill pill-ok">clean</span>' in v
    assert "no shortcut found at severity &gt;= 0.5" in v and "root-causes" not in v


def test_write_report_refuses_a_directory_as_output(small_scan, tmp_path):
    with pytest.raises(BiasscopeError, match="is a directory"):
        write_report(small_scan, tmp_path)


def test_report_renders_without_tensorflow(small_scan, tmp_path):
    out = tmp_path / "no-tf.html"
    code = ("import sys; from biasscope.report import write_report; "
            f"write_report({str(small_scan.path)!r}, {str(out)!r}); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; "
            "assert 'keras' not in sys.modules, 'keras was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0


_HELPER_SCRIPT = """
import os, signal, sys
from biasscope import helper
h = helper.start()  # as the console script does, before anything else
from biasscope.report import render_html
from biasscope.store import load
drawn = []
submit, result = helper.Helper.submit, helper.Helper.result
def submit_then_die(self, kind, payload):
    ok = submit(self, kind, payload)
    if sys.argv[3] == "die":
        os.kill(self.pid, signal.SIGKILL)  # the helper dies with the request under way
    return ok
def counted(self):
    got = result(self)
    drawn.append(None if got is None else len(got))
    return got
helper.Helper.submit, helper.Helper.result = submit_then_die, counted
with open(sys.argv[2], "w") as fh:
    fh.write(render_html(load(sys.argv[1])))
print(drawn)
"""


def test_a_helper_process_draws_two_thirds_of_the_thumbnails_and_the_report_is_the_same(tmp_path):
    """The console script's helper (forked before anything else) draws 2/3 of the thumbnails;
    the report is byte for byte the one drawn in this process, also when the helper dies with
    the request under way (then this process draws them)."""
    import ast

    scan_dir = make_synthetic_scan(tmp_path, 300, n_classes=3, size=64)  # 300 thumbnails
    expected = render_html(load(scan_dir))  # this process has no helper
    for mode, drawn in (("use", [200]), ("die", [None])):
        out = tmp_path / f"{mode}.html"
        r = subprocess.run([sys.executable, "-c", _HELPER_SCRIPT, str(scan_dir), str(out), mode],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert ast.literal_eval(r.stdout.strip().splitlines()[-1]) == drawn, mode
        assert out.read_text() == expected, mode


def test_the_helper_process_ends_with_its_parent_even_when_the_parent_is_killed():
    code = ("import os, signal; from biasscope import helper; h = helper.start(); "
            "print(h.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    # returns once the parent is dead: the helper holds no copy of the output pipe
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9
    pid = int(r.stdout.strip())

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/status") as fh:
                return any(ln.split()[1] == "Z" for ln in fh if ln.startswith("State:"))  # a zombie
        except FileNotFoundError:
            return True

    deadline = time.time() + 10
    while not gone() and time.time() < deadline:
        time.sleep(0.05)
    assert gone(), f"helper {pid} outlived its parent"


def test_the_console_script_forks_the_helper_only_for_commands_that_write_a_report(monkeypatch):
    import biasscope.cli as cli
    from biasscope import helper

    started = []
    monkeypatch.setattr(helper, "start", lambda *, analysis: started.append(analysis))
    monkeypatch.setattr(cli, "main", lambda: None)
    # None: no helper; else whether it prepares for the analysis (the commands that scan)
    for argv, fork in ((["scan", "m", "d"], True), (["report", "s"], False), (["bench"], True),
                       (["demo"], True), (["compare", "a", "b"], None), (["layers", "m"], None),
                       ([], None)):
        started.clear()
        monkeypatch.setattr(sys, "argv", ["biasscope", *argv])
        cli.run()
        assert started == ([] if fork is None else [fork]), argv


# ----------------------------------------------------------------------------------------------
# in the browser
# ----------------------------------------------------------------------------------------------


def test_report_in_browser_figures_explorer_and_confusion_cells(small_scan, small_report):
    sync_api = _browser()
    with sync_api.sync_playwright() as pw:
        p = Page(pw, small_report)
        try:
            page = p.page
            assert p.missing_figures() == []
            n_figs = page.evaluate("document.querySelectorAll('.fig[data-fig]').length")
            assert n_figs >= 7  # kinds, per class, explorer, eigengaps, confusion, attention, groups
            # every thumbnail placeholder got its images
            assert page.evaluate("[...document.querySelectorAll('.thumb[data-row]')]"
                                 ".every(b => b.dataset.filled === '1' && b.querySelector('img'))")
            # a click on an explorer point fills the detail panel
            t = small_scan.table
            i = int(np.flatnonzero(~t["correct"].to_numpy())[0]) if (~t["correct"]).any() else 0
            page.evaluate("i => document.getElementById('explorer-plot').emit('plotly_click', "
                          "{points: [{customdata: i}]})", i)
            assert page.is_visible("#detail")
            assert page.text_content("#detail-path") == t["path"][i]
            assert page.locator("#detail-images img").count() == (2 if t["correct"][i] else 3)
            body = page.inner_text("#detail-table")
            assert t["label"][i] in body and "top predictions" in body and "inside_frac" in body
            # ... and a real mouse click on the plot works too
            page.evaluate("document.getElementById('detail').hidden = true")
            page.locator("#explorer-plot").scroll_into_view_if_needed()
            pt = page.evaluate("""() => {
                const gd = document.getElementById('explorer-plot');
                const tr = gd._fullData.findIndex(d => d.x.length > 0 && d.name !== 'selected');
                const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
                const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
                return {x: r.left + xa.l2p(gd._fullData[tr].x[0]), y: r.top + ya.l2p(gd._fullData[tr].y[0]),
                        row: gd._fullData[tr].customdata[0]};
            }""")
            page.mouse.click(pt["x"], pt["y"])
            page.wait_for_selector("#detail:not([hidden])", timeout=5000)
            assert page.text_content("#detail-path") == t["path"][pt["row"]]
            # a click on each confusion-matrix cell shows that cell's images
            classes = page.evaluate("window.biasscope.data.classes")
            label, pred = t["label"].to_numpy(), t["pred"].to_numpy()
            for ti, tc in enumerate(small_scan.classes):
                for pj, pc in enumerate(classes):
                    n_cell = int(((label == tc) & (pred == pc)).sum())
                    if not n_cell:
                        continue
                    page.evaluate("([x, y]) => document.getElementById('confusion-plot').emit("
                                  "'plotly_click', {points: [{x: x, y: y}]})", [pj, ti])
                    assert page.locator("#cell-grid .thumb").count() == n_cell
                    assert page.text_content("#cell-title").startswith(f"true {tc} → predicted {pc}: {n_cell} ")
                    if tc != pc:  # predicted-class CAM next to true-class CAM
                        assert page.locator("#cell-grid .thumb").first.locator("img").count() == 2
            # the explorer recolours without errors
            for mode in ("label", "pred", "correct", "inside_frac", "confidence", "cluster"):
                page.select_option("#explorer-colour", mode)
            page.wait_for_timeout(200)
            assert p.errors == [], p.errors
        finally:
            p.close()


def test_report_escapes_html_in_class_and_file_names(tmp_path):
    sync_api = _browser()
    from conftest import make_image_set

    data = make_image_set(tmp_path / "data", n_per_class=4, classes=("plain", XSS_CLASS))
    try:
        for cls in ("plain", XSS_CLASS):
            for kind in ("images", "masks"):
                (data / kind / cls / f"{cls}_000.png").rename(data / kind / cls / f"{XSS_FILE}.png")
                (data / kind / cls / f"{cls}_001.png").rename(data / kind / cls / f"{XSS_FILE2}.png")
    except OSError as exc:  # pragma: no cover - a filesystem that refuses such names
        pytest.skip(f"the filesystem refuses the test's file names: {exc}")
    scan = _scan(data, tmp_path, name="xss", n_classes=2)
    path = write_report(scan)
    html = path.read_text()
    # nothing user-supplied reaches the HTML unescaped (escaped in text, \u003c-escaped in JSON)
    assert XSS_CLASS not in html and XSS_FILE not in html and "<!--" not in html
    with sync_api.sync_playwright() as pw:
        p = Page(pw, path)
        try:
            page = p.page
            assert p.missing_figures() == []
            text = page.inner_text("body")
            assert XSS_CLASS in text  # shown literally
            rows = page.evaluate("window.biasscope.data.rows.path")
            i = next(k for k, r in enumerate(rows) if XSS_FILE in r)
            page.evaluate("i => window.biasscope.showDetail(i)", i)
            assert page.text_content("#detail-title") == f"{XSS_FILE}.png"
            page.evaluate("([x, y]) => document.getElementById('confusion-plot').emit('plotly_click', "
                          "{points: [{x: x, y: y}]})", [1, 1])
            for mode in ("label", "pred", "cluster"):
                page.select_option("#explorer-colour", mode)
            # Plotly text shows the class name literally too (legend of the explorer)
            assert XSS_CLASS in page.text_content("#explorer-plot .legend") or \
                XSS_CLASS in page.text_content("#confusion-plot")
            page.wait_for_timeout(300)
            assert p.dialogs == []
            assert page.evaluate("typeof window.__pwned") == "undefined"
            assert page.locator("img[src='x']").count() == 0
            assert p.errors == [], p.errors
        finally:
            p.close()


@pytest.mark.slow
def test_10k_image_report_is_small_and_opens_fast(tmp_path):
    sync_api = _browser()
    scan_dir = make_synthetic_scan(tmp_path, 10_000)
    t0 = time.perf_counter()
    path = write_report(scan_dir)
    render_s = time.perf_counter() - t0
    size_mb = path.stat().st_size / 1e6
    with sync_api.sync_playwright() as pw:
        p = Page(pw, path)
        try:
            first, paint = p.first_figure_s, p.first_paint_s
            assert p.missing_figures() == []
            capped = p.page.evaluate("window.biasscope.data.rows.thumb.filter(t => t === -1).length")
            assert p.errors == [], p.errors
        finally:
            p.close()
    print(f"\n10,000-image report: {size_mb:.1f} MB, written in {render_s:.1f} s, "
          f"first figure after {first:.2f} s (painted {paint:.2f} s after navigation start), "
          f"{capped} images without thumbnails")
    assert size_mb < 30
    # A guard against a gross regression (a page script quadratic in the rows takes minutes), not
    # a timing: the figures are printed above (alone on 2 cores: first figure after 2.5 s; 3.1 s
    # once while another test worker trained a model).
    assert first < 10.0 and paint < 10.0
    assert capped > 0


def test_evidence_grids_become_heatmaps_and_nested_figures_tables():
    from biasscope.report.build import _evidence_items

    ev = {"mean_heatmap": [[0.0, 1.0], [0.5, 0.25]], "n": 3,
          "victims": {"one": {"n_draws_to_class": 4, "n_victims_original": 2},
                      "<b>x</b>": {"n_draws_to_class": 1, "n_victims_original": 0}},
          "per_attribute": {"background": {"grass": {"rate": 0.5, "n_draws": 40},
                                           "sand": {"rate": 0.0, "n_draws": 30}}},
          "clusters": [{"id": "c", "size": 5, "mean_heatmap": [[1.0, 0.0], [0.0, 0.0]]}]}
    items = {it["key"]: it for it in _evidence_items(ev, {})}
    assert items["mean_heatmap"]["kind"] == "heatmap"
    assert items["mean_heatmap"]["uri"].startswith("data:image/png;base64,")
    assert items["n"]["kind"] == "scalar" and items["n"]["text"] == "3"
    v = items["victims"]
    assert v["kind"] == "table" and v["columns"] == ["", "n_draws_to_class", "n_victims_original"]
    assert [c["text"] for c in v["rows"][0]] == ["one", "4", "2"]
    bg = items["per_attribute.background"]
    assert bg["kind"] == "table" and [r[0]["text"] for r in bg["rows"]] == ["grass", "sand"]
    # a grid inside a table row is left out, not printed as numbers
    assert items["clusters"]["columns"] == ["id", "size"]
