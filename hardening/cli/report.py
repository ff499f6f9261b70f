"""``edgeward audit MODEL --data ...`` (full security review) and ``edgeward gate``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from hardening.cli.common import JSON_OPT, handle_errors, out, print_json, progress_display, table


def register(app: typer.Typer, audit: typer.Typer) -> None:
    audit.command("full", help="Full security review of MODEL (also: `edgeward audit MODEL --data ...`).")(audit_full)
    app.command("gate")(gate_cmd)


@handle_errors
def audit_full(
    model: Path = typer.Argument(..., help="Float ONNX model to review."),
    data: Path = typer.Option(..., "--data", help=".npz with x/y, x_train/y_train, x_cal/y_cal (and x_thief, ood_*)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for report.json, report.html, junit.xml and work files."),
    torch_source: Path = typer.Option(None, "--torch-source", help="PyTorch source of MODEL (white-box attacks, pruning)."),
    policy: Path = typer.Option(None, "--policy", help="Policy TOML (thresholds; see docs/policy.md). Default: built-in."),
    profile: str = typer.Option("quick", "--profile", help="quick (minutes) or thorough."),
    variants: Path = typer.Option(None, "--variants", help="Audit these variants (variants.json) instead of compressing."),
    kinds: str = typer.Option(None, "--kinds", help="Comma-separated compression kinds (default: all that apply)."),
    areas: str = typer.Option(
        "profiling,robustness,extraction,ood", "--areas", help="Comma-separated areas to run; others show as skipped checks."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for every area (recorded in the report)."),
    allow_skipped: bool = typer.Option(
        False, "--allow-skipped", help="Accept a partial review: skipped checks do not fail the verdict."
    ),
    executor: str = typer.Option(
        "local", "--executor", help="Where the sharded areas (robustness, extraction, OOD) run: local (this "
        "process), ray (a local cluster on 127.0.0.1) or ray://HOST:PORT (join one; workers must see the same paths)."
    ),
    workers: int | None = typer.Option(None, "--workers", help="CPUs of the local Ray cluster (default: all)."),
    resume: bool = typer.Option(
        False, "--resume", help="Reuse the finished shards checkpointed in --out by an interrupted run."
    ),
    json_out: bool = JSON_OPT,
) -> None:
    """Compress, profile, attack (evasion, extraction) and OOD-test every variant; write the review.

    Exit 0 if every policy check passed, 1 if any failed (or was skipped, without
    --allow-skipped), 2 on bad input.
    """
    from hardening.errors import InputError
    from hardening.executor import make_executor, parse_executor
    from hardening.report import load_policy, run_full_audit

    pol = load_policy(policy)
    if profile not in ("quick", "thorough"):
        raise InputError(f"--profile must be quick or thorough, got {profile!r}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be a positive integer, got {workers}")
    parse_executor(executor)  # a bad spelling is a usage error before Ray starts
    kind_t = tuple(k.strip() for k in kinds.split(",") if k.strip()) if kinds else None
    area_t = tuple(a.strip() for a in areas.split(",") if a.strip())
    command = "edgeward " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with progress_display("audit", transient=False) as update:

        def progress(stage: str, msg: str, done: int, total: int) -> None:
            update("audit", f"{stage:<11} {msg[:70]}", done, total)

        runner = make_executor(executor, workers)
        try:
            res = run_full_audit(
                model, data, out_dir, torch_source=torch_source, variants_file=variants, kinds=kind_t, policy=pol,
                profile=profile, seed=seed, areas=area_t, progress=progress, command=command,
                allow_skipped=allow_skipped, executor=runner, resume=resume,
            )
        finally:
            runner.close()
    rep = res.report
    stages = rep["provenance"]["stages"]
    if json_out:
        print_json({"verdict": rep["verdict"], "report": str(res.report_path), "html": str(res.html_path),
                    "junit": str(res.junit_path), "findings": rep["findings"], "stages": stages})
    else:
        table("stages (time and peak memory)", ["stage", "variant", "seconds", "peak RSS MB"],
              [(r["stage"], r["variant"] or "all", f"{r['seconds']:.1f}", r["peak_rss_mb"]) for r in stages])
        v = rep["verdict"]
        style = "green" if v["passed"] else "red"
        out.print(f"[bold {style}]{v['headline']}[/]")
        high = [f for f in rep["findings"] if f["severity"] == "high"]
        if high:
            table("high-severity findings", ["area", "variant", "finding"], [(f["area"], f["variant"], f["message"]) for f in high])
        out.print(f"report: {res.report_path}\nhtml:   {res.html_path}\njunit:  {res.junit_path}  "
                  f"({rep['timings']['total_s']:.0f} s)")
    if not res.passed:
        raise typer.Exit(1)


@handle_errors
def gate_cmd(
    report: Path = typer.Argument(..., help="report.json of the candidate."),
    baseline: Path = typer.Option(..., "--baseline", help="report.json of the released/baseline model."),
    policy: Path = typer.Option(None, "--policy", help="Policy TOML whose [gate] tolerances to use (default: the report's)."),
    regressions_only: bool = typer.Option(
        False, "--regressions-only", help="Do not fail on the candidate's own failed policy checks."
    ),
    show_all: bool = typer.Option(False, "--all", help="List unchanged metrics too."),
    json_out: bool = JSON_OPT,
) -> None:
    """Fail (exit 1) on regressions beyond tolerance or failed checks; exit 2 on bad/incompatible reports."""
    from hardening.report import compare_reports, load_policy, load_report

    cur = load_report(report)
    base = load_report(baseline)
    tol = load_policy(policy).gate if policy else None
    res = compare_reports(cur, base, tol)
    failed_checks = [] if regressions_only else res.failed_checks
    passed = not res.regressions and not failed_checks
    if json_out:
        d = res.to_dict()
        d["passed"] = passed
        d["failed_checks"] = failed_checks
        print_json(d)
    else:
        rows = [
            (c.variant, c.metric, c.baseline, c.current,
             None if c.delta is None else (f"{c.delta:+.1%}" if c.relative else f"{c.delta:+.3f}"),
             f"{c.tolerance:.0%}{' rel' if c.relative else ''}", c.status.upper() if c.status == "regression" else c.status)
            for c in res.changes if show_all or c.status != "ok"
        ]
        if rows:
            table(f"gate: {report} vs baseline {baseline}",
                  ["variant", "metric", "baseline", "current", "change", "tolerance", "status"], rows)
        for c in res.regressions:
            out.print(f"[red]REGRESSION[/red] {c.message}", highlight=False)
        for ch in failed_checks:
            out.print(f"[red]FAILED CHECK[/red] {ch['message']}", highlight=False)
        n_ok = sum(c.status == "ok" for c in res.changes)
        out.print(f"{'[green]PASS' if passed else '[red]FAIL'}[/]: {len(res.regressions)} regression(s), "
                  f"{len(failed_checks)} failed check(s), {n_ok} metric(s) within tolerance")
    if not passed:
        raise typer.Exit(1)
