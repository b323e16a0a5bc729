"""The command line: parses options, calls the library, prints. No computation here.

Library code raises :class:`BiasscopeError`; only this module turns it into a one-line message
and exit code 2.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import BiasscopeError, ScanInterrupted
from .methods import METHOD_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Is this vision model right for the right reasons? Grad-CAM over a whole "
                       "labelled validation set, attention-vs-mask metrics, shortcut findings.")
out_console = Console()
err_console = Console(stderr=True)


Method = Enum("Method", {name: name for name in METHOD_NAMES}, type=str)  # type: ignore[misc]
Engine = Enum("Engine", {name: name for name in ("local", "ray")}, type=str)  # type: ignore[misc]


# shared option declarations (defined once, used by several commands)
ModelArg = typer.Argument(..., help="A .keras or .h5 file, or a SavedModel directory.", exists=True)
UnsafeOpt = typer.Option(False, "--unsafe-model", help="Allow Lambda/custom code when loading (trusted models only).")
BatchOpt = typer.Option(16, "--batch-size", min=1, help="Images per compiled batch.")
MethodOpt = typer.Option(Method["gradcam"], "--method", help="CAM method (the README compares them).")
ScoreCamOpt = typer.Option(32, "--scorecam-channels", min=1,
                           help="Score-CAM: the N channels with the highest mean activation (cost ~N forward passes per image).")
PreprocessOpt = typer.Option("none", "--preprocess",
                             help="none (0..255), scale01, or a keras.applications module name (e.g. resnet50).")


def _fail(exc: BiasscopeError) -> None:
    # escaped: a message quoting a gate like delta.accuracy[cat]<0 must not read as markup
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def scan(
    model: Path = ModelArg,
    data: Path = typer.Argument(..., help="DATA folder (images/<class>/..., masks/, manifest.csv) or a manifest .csv."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Mask folder mirroring the class folders."),
    out: Path = typer.Option(Path("biasscope-scan"), "--out", help="Scan directory to write (resumed if interrupted)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Target layer (nested path like base/conv_5 allowed); default: automatic."),
    method: Method = MethodOpt,
    scorecam_channels: int = ScoreCamOpt,
    batch_size: int = BatchOpt,
    image_size: Optional[Tuple[int, int]] = typer.Option(None, "--image-size", help="H W, for models with a flexible input size.", show_default=False),
    preprocess: str = PreprocessOpt,
    class_map: Optional[Path] = typer.Option(None, "--class-map", help='JSON {"class_name": output_index}.'),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Scan at most N images (spread over classes)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an interrupted scan in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a scan of another model/dataset in --out."),
    unsafe_model: bool = UnsafeOpt,
    seed: int = typer.Option(0, "--seed", help="Seeds clustering, projection and the counterfactual pairing."),
    counterfactuals: Optional[bool] = typer.Option(None, "--counterfactuals/--no-counterfactuals",
                                                   help="Background-swap tests (default: on when masks exist).", show_default=False),
    report: bool = typer.Option(True, "--report/--no-report", help="Write OUT/report.html."),
    fail_on: Optional[List[str]] = typer.Option(None, "--fail-on", help="Exit 1 when this gate trips: a finding kind, severity>=X, or a summary figure like worst_group_acc<0.8. Repeatable.", show_default=False),
    engine: Engine = typer.Option(Engine["local"], "--engine", help="Who runs the CAM pass and the counterfactual pass: local (this process) or ray (Ray Data actors; pip install 'biasscope[ray]'). Same result either way."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="HOST:PORT of a running Ray cluster (--engine ray; default: RAY_ADDRESS or a local Ray).", show_default=False),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray actors, one model each (default: one per CPU of the cluster).", show_default=False),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="GPUs each Ray actor reserves (default 0).", show_default=False),
    chunk_size: Optional[int] = typer.Option(None, "--chunk-size", min=1, help="Images per stored chunk, rounded down to whole batches (default: 64 batches): the unit of resume and of a Ray actor's work item.", show_default=False),
) -> None:
    """Run Grad-CAM (or another CAM method) over DATA with MODEL, analyse the heatmaps and report findings."""
    from .api import scan as run_scan

    try:
        result = run_scan(model, data, masks=masks, out=out, layer=layer, method=method.value,
                          batch_size=batch_size, image_size=image_size, preprocess=preprocess,
                          class_map=class_map, limit=limit, resume=resume, overwrite=overwrite,
                          unsafe_model=unsafe_model, seed=seed, counterfactuals=counterfactuals,
                          fail_on=fail_on or (), report=report, scorecam_channels=scorecam_channels,
                          engine=engine.value, ray_address=ray_address, workers=workers,
                          gpus_per_worker=gpus_per_worker, chunk_size=chunk_size)
    except BiasscopeError as exc:
        _fail(exc)
    except ScanInterrupted as exc:
        err_console.print(f"\n{exc}", highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(130)
    _print_verdict(result)
    _print_summary(result)
    _print_findings(result)
    _exit_on_gates(result)


def _print_verdict(result) -> None:
    """The verdict of :func:`biasscope.summary.verdict`, as stored in the summary: the status,
    then one line per root cause (or the headline when there is none). Nothing for a scan
    whose summary predates the verdict."""
    v = (getattr(result, "summary", None) or {}).get("verdict")
    if not isinstance(v, dict) or not v.get("status"):
        return
    status = str(v["status"])
    colour = {"shortcut": "red", "review": "yellow", "clean": "green"}.get(status, "white")
    roots = v.get("root_causes") or []
    if roots:
        n = int(v.get("n_root_causes") or len(roots))
        more = f", {len(roots)} shown" if n > len(roots) else ""
        head = f"{n} root cause{'s' if n != 1 else ''}{more}"
    else:
        head = str(v.get("line") or "")
    out_console.print(f"[bold]verdict:[/] [bold {colour}]{escape(status)}[/]" + (f" - {escape(head)}" if head else ""),
                      highlight=False, soft_wrap=True)
    for rc in roots:
        out_console.print(f"  [red]{float(rc.get('severity') or 0.0):.2f}[/]  {escape(str(rc.get('kind')))}  "
                          f"{escape(str(rc.get('line')))}", highlight=False, soft_wrap=True)
    if v.get("n_explained"):
        out_console.print(f"  [dim]{int(v['n_explained'])} finding(s) explained by another finding[/]",
                          highlight=False)


def _print_findings(result, top: int = 10) -> None:
    findings = result.findings
    if not findings:
        out_console.print("no findings", highlight=False)
        return
    table = Table(title=f"top findings ({min(top, len(findings))} of {len(findings)}, by severity)",
                  title_justify="left")
    table.add_column("severity", justify="right")
    table.add_column("kind", no_wrap=True)
    table.add_column("finding", overflow="fold")
    for f in findings[:top]:
        sev = float(f["severity"])
        colour = "red" if sev >= 0.7 else ("yellow" if sev >= 0.4 else "green")
        where = f" (cluster {f['cluster']})" if f.get("cluster") is not None else ""
        table.add_row(f"[{colour}]{sev:.2f}[/]", f["kind"], escape(f["title"] + where))
    out_console.print(table)
    skipped = {k: v["reason"] for k, v in result.analysis.get("detectors", {}).items() if v["status"] == "skipped"}
    for name, reason in skipped.items():
        out_console.print(f"[dim]{name} not run: {escape(str(reason))}[/]")


def _exit_on_gates(result) -> None:
    gates = result.summary.get("gates", [])
    for g in gates:
        mark = "[red]TRIPPED[/]" if g["tripped"] else "[green]ok[/]"
        out_console.print(f"gate {escape(g['expr'])}: {mark} ({escape(g['detail'])})", highlight=False)
    if any(g["tripped"] for g in gates):
        raise typer.Exit(1)


def _print_summary(result, report_line: bool = True) -> None:
    t = result.table
    meta = result.meta
    table = Table(title="biasscope scan", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("images", f"{len(t):,}" + (f" ({len(meta.get('skipped', []))} skipped)" if meta.get("skipped") else ""))
    table.add_row("accuracy", f"{t['correct'].mean():.1%}" if len(t) else "-")
    inside = t["inside_frac"].dropna()
    n_masked = int(t["mask_frac"].notna().sum()) if "mask_frac" in t else 0
    if len(inside):
        attention = f"{inside.mean():.3f} over {len(inside):,} masked images"
    elif n_masked:  # masks exist, but a CAM that is zero everywhere has no inside share
        attention = f"undefined: the heatmaps are all zero ({n_masked:,} masked images)"
    else:
        attention = "no masks"
    table.add_row("mean inside_frac", attention)
    table.add_row("layer", f"{meta['layer']} {tuple(meta['layer_shape'])}")
    rate = meta.get("timings", {}).get("images_per_s")
    if rate:
        table.add_row("speed", f"{rate:,.1f} images/s")
    out_console.print(table)
    out_console.print(f"result: {result.path}", soft_wrap=True, highlight=False)
    if report_line and (result.path / "report.html").is_file():
        out_console.print(f"report: {result.path / 'report.html'}", soft_wrap=True, highlight=False)


@app.command()
def report(
    scan_dir: Path = typer.Argument(..., help="A finished scan directory (biasscope scan --out).",
                                    exists=True, file_okay=False),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: SCAN_DIR/report.html).",
                                       dir_okay=False, show_default=False),
) -> None:
    """Re-render the interactive HTML report from a stored scan (no TensorFlow work)."""
    from .report import write_report

    try:
        path = write_report(scan_dir, out)
    except BiasscopeError as exc:
        _fail(exc)
    out_console.print(f"report: {path}", soft_wrap=True, highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("reports/demo"), "--out", help="Where the demo scan is written."),
    size: str = typer.Option("default", "--size", help="default, or small (a quick check)."),
    retrain: bool = typer.Option(False, "--retrain", help="Retrain the demo CNN even if cached."),
) -> None:
    """Build the built-in bias benchmark, train its small CNN (cached), scan it."""
    from .demo import run_demo

    try:
        res = run_demo(out, size=size, retrain=retrain)
    except BiasscopeError as exc:
        _fail(exc)
    ev = res["truth_eval"]
    _print_verdict(res["scan"])
    _print_summary(res["scan"], report_line=False)
    table = Table(title="the demo model against the benchmark's ground truth", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("average accuracy", f"{ev['average_accuracy']:.1%}")
    wg = ev["worst_group"]
    table.add_row("worst-group accuracy", f"{ev['worst_group_accuracy']:.1%} ({wg['class']} on {wg['background']})")
    if ev.get("bias_aligned_accuracy") is not None:
        table.add_row("biased classes on / off their background",
                      f"{ev['bias_aligned_accuracy']:.1%} / {ev['bias_conflicting_accuracy']:.1%}")
    by_class = res["scan"].table.groupby("label")["inside_frac"].mean()
    table.add_row("mean inside_frac by class", ", ".join(f"{c} {v:.2f}" for c, v in by_class.items()))
    out_console.print(table)
    _print_findings(res["scan"])
    out_console.print(f"data: {res['data']}\nscan: {res['scan'].path}", soft_wrap=True, highlight=False)
    report_path = res["scan"].path / "report.html"
    if report_path.is_file():
        out_console.print(f"[bold]open the report:[/] {report_path}", soft_wrap=True, highlight=False)


@app.command()
def layers(
    model: Path = ModelArg,
    unsafe_model: bool = UnsafeOpt,
    image_size: Optional[Tuple[int, int]] = typer.Option(None, "--image-size", help="H W, for models with a flexible input size.", show_default=False),
) -> None:
    """List the layers a CAM can target (spatial outputs and patch-grid tokens), marking the automatic choice."""
    from .api import list_layers

    try:
        cands, auto = list_layers(model, unsafe_model=unsafe_model, image_size=image_size)
    except BiasscopeError as exc:
        _fail(exc)
    table = Table(title=f"CAM target layers of {model.name}")
    for col in ("", "layer", "type", "output (H, W, C) or tokens"):
        table.add_column(col, no_wrap=True)  # whole paths, so that they can be copied into --layer
    for info in cands:
        mark = "auto" if auto is not None and info.path == auto.path else ""
        table.add_row(mark, info.path, info.class_name, info.describe())
    widest = [max([len(r) for r in rows] or [0]) for rows in
              (["auto"], [i.path for i in cands], [i.class_name for i in cands], [i.describe() for i in cands])]
    Console(width=max(out_console.width, sum(widest) + 13)).print(table)
    if auto is None:
        err_console.print("no automatic choice: no layer has a spatial output larger than 1x1 or patch-grid "
                          "tokens the scores depend on")


@app.command()
def bench(
    model: Optional[Path] = typer.Argument(None, help="A model file; or use --arch.", exists=True),
    arch: Optional[str] = typer.Option(None, "--arch", help="A keras.applications architecture, built with weights=None."),
    n: int = typer.Option(512, "--n", min=1, help="Number of images."),
    batch_size: int = BatchOpt,
    image_size: Tuple[int, int] = typer.Option((224, 224), "--image-size", help="H W (for --arch)."),
    recipe_sample: int = typer.Option(8, "--recipe-sample", min=0, help="Images timed with the per-image recipe (0: skip)."),
    preprocess: str = PreprocessOpt,
    method: Optional[List[str]] = typer.Option(None, "--method", help="CAM method to time (repeatable, or 'all'); default gradcam.", show_default=False),
    scorecam_channels: Optional[List[int]] = typer.Option(None, "--scorecam-channels", min=1, help="Score-CAM's N (repeatable: one row each); default 32.", show_default=False),
    whole_job: bool = typer.Option(False, "--whole-job", help="Time the whole job (CAM pass, counterfactuals, analysis, findings, report) of the demo model on --n benchmark images, each stage as a ratio to the CAM pass."),
    analysis: bool = typer.Option(False, "--analysis", help="Time the analysis (clusters, 2-D map, statistics) alone on --n synthetic scan rows."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Scan-from-disk throughput of each CAM method as a ratio to a compiled forward pass over the same images."""
    from .bench import run_analysis_bench, run_bench, run_whole_job

    if analysis:
        try:
            res = run_analysis_bench(n)
        except BiasscopeError as exc:
            _fail(exc)
        out_console.print(f"analysis of {res['n']:,} synthetic rows: {res['analysis_s']:.1f} s, "
                          f"peak RSS {res['peak_rss_mb']:.0f} MB ({res['n_clusters']} clusters; {res['device']})")
        if json_out:
            json_out.write_text(json.dumps(res, indent=2))
        return
    if whole_job:
        if model is not None or arch is not None:
            _fail(BiasscopeError("--whole-job times the demo model on the built-in benchmark; "
                                 "give no MODEL or --arch with it"))
        try:
            res = run_whole_job(n, batch_size=batch_size)
        except BiasscopeError as exc:
            _fail(exc)
        table = Table(title=f"biasscope bench --whole-job: demo model, {res['n']:,} benchmark images, "
                            f"batch {res['batch_size']}, {res['device']}")
        for col in ("stage", "seconds", "x CAM pass"):
            table.add_column(col, justify="right")
        for key, sec in res["stages"].items():
            name = key[:-2].replace("_", " ")
            if key in res.get("alongside_counterfactuals", {}):
                name += " (after cf.)"
            table.add_row(name, f"{sec:.2f}", f"{sec / res['stages']['cam_pass_s']:.2f}")
        table.add_row("whole job (scan command)", f"{res['total_s']:.2f}", f"{res['total_over_pass']:.2f}")
        out_console.print(table)
        for key, sec in res.get("alongside_counterfactuals", {}).items():
            out_console.print(f"{key[:-2]} ran alongside the counterfactual pass: {sec:.2f} s in all, "
                              "of which the row above is what the job waited for after it")
        out_console.print(f"peak RSS: {res['peak_rss_mb']:.0f} MB")
        if json_out:
            json_out.write_text(json.dumps(res, indent=2))
        return
    try:
        res = run_bench(model, arch=arch, n=n, batch_size=batch_size, image_size=tuple(image_size),
                        recipe_sample=recipe_sample, preprocess=preprocess,
                        methods=tuple(method or ("gradcam",)), scorecam_channels=tuple(scorecam_channels or (32,)))
    except BiasscopeError as exc:
        _fail(exc)
    table = Table(title=f"biasscope bench: {res['model']}, {res['n']} images {res['image_size'][0]}x"
                        f"{res['image_size'][1]}, batch {res['batch_size']}, {res['device']}")
    for col in ("step", "seconds", "images/s", "x forward"):
        table.add_column(col, justify="right")
    table.add_row("compiled forward pass (decoded, in memory)", f"{res['forward_s']:.2f}",
                  f"{res['forward_img_s']:.1f}", "1.00")
    for label, fig in res["methods"].items():
        table.add_row(f"scan from disk, {label}", f"{fig['scan_s']:.2f}",
                      f"{fig['scan_img_s']:.1f}", f"{fig['scan_over_forward']:.2f}")
    if res.get("recipe_per_image_s"):
        table.add_row(f"per-image recipe (median of {recipe_sample}, extrapolated)",
                      f"{res['recipe_per_image_s'] * res['n']:.2f}",
                      f"{1 / res['recipe_per_image_s']:.1f}", f"{res['recipe_over_forward']:.2f}")
    elif res.get("recipe_error"):
        table.add_row("per-image recipe", "-", "-", res["recipe_error"])
    out_console.print(table)
    out_console.print(f"peak RSS after the scan: {res['peak_rss_mb_after_scan']:.0f} MB; "
                      f"CAM graphs traced per method: {max(f['traces'] for f in res['methods'].values())}; "
                      f"layer {res['layer']} ({res['layer_output']})", soft_wrap=True)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))



@app.command()
def compare(
    baseline: Path = typer.Argument(..., help="The baseline's finished scan directory (e.g. the model in production)."),
    candidate: Path = typer.Argument(..., help="The candidate's finished scan directory, over the same images."),
    out: Path = typer.Option(Path("biasscope-compare"), "--out", help="Directory to write compare.json and compare.html to."),
    html: bool = typer.Option(True, "--html/--no-html", help="Write OUT/compare.html."),
    fail_on: Optional[List[str]] = typer.Option(None, "--fail-on", help="Exit 1 when this gate trips: regressed, new:KIND, delta.accuracy<-0.01, delta.worst_group_acc<-0.02, delta.inside_frac[CLASS]<-0.05. Repeatable.", show_default=False),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write a short Markdown summary (a PR comment, a CI job summary).", dir_okay=False, show_default=False),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write JUnit XML: one test case per gate.", dir_okay=False, show_default=False),
) -> None:
    """Compare two stored scans of the same images: accuracy, flips, findings and attention (no TensorFlow)."""
    from .compare import compare as run_compare

    try:
        result = run_compare(baseline, candidate, fail_on=fail_on or ())
        path = result.write(out, html=html)
        if markdown is not None:
            result.write_markdown(markdown)
        if junit is not None:
            result.write_junit(junit)
    except BiasscopeError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(BiasscopeError(f"cannot write {exc.filename or out}: {exc.strerror or exc}"))
    _print_comparison(result.result)
    out_console.print(f"result: {path}", soft_wrap=True, highlight=False)
    if html:
        out_console.print(f"report: {path.parent / 'compare.html'}", soft_wrap=True, highlight=False)
    for g in result.gates:
        mark = "[red]TRIPPED[/]" if g["tripped"] else "[green]ok[/]"
        out_console.print(f"gate {escape(g['expr'])}: {mark} ({escape(g['detail'])})", highlight=False)
    if result.tripped:
        raise typer.Exit(1)


def _print_comparison(r: dict) -> None:
    from .compare import shown_classes

    for w in r["warnings"]:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    table = Table(title=f"biasscope compare: {r['n_paired']:,} paired images", title_justify="left")
    table.add_column("class", overflow="fold")
    for col in ("base", "cand", "delta acc (95% CI)", "McNemar p", "lost/won", "d inside"):
        table.add_column(col, justify="right", no_wrap=True)

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    shown = shown_classes(r)
    if len(shown) < len(r["per_class"]):
        table.caption = f"the {len(shown)} of {len(r['per_class'])} classes with the lowest accuracy delta; all in compare.json"
    for cls, row in [*shown, ("all", r["overall"])]:
        d, ci = row["delta_accuracy"], row["delta_accuracy_ci"]
        inside = row.get("inside_frac")
        table.add_row(escape(str(cls)), pct(row["baseline_accuracy"]), pct(row["candidate_accuracy"]),
                      "-" if d is None else f"{d:+.2f} ({ci[0]:+.2f}, {ci[1]:+.2f})", f"{row['p_value']:.2g}",
                      f"{row['right_to_wrong']}/{row['wrong_to_right']}",
                      "-" if inside is None else f"{inside['delta']:+.3f}")
    out_console.print(table)
    fd = r["findings"]
    out_console.print("findings: " + ", ".join(f"{len(fd[k])} {k}" for k in ("new", "worse", "better", "resolved", "unchanged")),
                      highlight=False)
    for k in ("new", "worse"):
        for e in fd[k][:5]:
            out_console.print(f"  {k} [red]{e['candidate_severity']:.2f}[/] {escape(str(e['kind']))}  "
                              f"{escape(str(e['candidate_title']))}", highlight=False, soft_wrap=True)
    v = r["verdict"]
    colour = {"regression": "red", "review": "yellow"}.get(v["status"], "green")
    out_console.print(f"[bold]verdict:[/] [bold {colour}]{escape(v['status'])}[/] - {escape(v['line'])}",
                      highlight=False, soft_wrap=True)

def main() -> None:
    from . import _tf

    _tf.FREEZE_AFTER_IMPORT = True  # a command-line process: see biasscope._tf
    _tf.HIDE_DURING_IMPORT = ("matplotlib", "cv2", "sklearn", "scipy")
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except BiasscopeError as exc:  # a library error that escaped a command
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:
        # usage errors (bad option, missing argument, path that does not exist) carry a
        # format_message and an exit code; show them as one line instead of a help panel
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            out_console.print(ctx.get_help(), highlight=False)
            sys.exit(0)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        err_console.print(f"[bold red]error:[/] {where}{exc.format_message()}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def run() -> None:
    """The console script: :func:`main`, with a helper process forked first for the commands
    that write a report (:mod:`biasscope.helper`: it must be forked before TensorFlow loads;
    for those that scan it also runs the analysis). ``main`` alone (a test, a library user)
    never forks."""
    if len(sys.argv) > 1 and sys.argv[1] in ("scan", "report", "demo", "bench"):
        from . import helper

        helper.start(analysis=sys.argv[1] != "report")
    main()


if __name__ == "__main__":
    run()
