"""``edgeward audit extraction``: queries and time needed to steal the model, with and without the guard."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hardening.cli.common import JSON_OPT, console, dumps, handle_errors, print_json, progress_display, table
from hardening.errors import CheckFailed, InputError


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add this area's commands to the main app and the audit group."""
    audit.command("extraction")(audit_extraction_cmd)
    app.command("calibrate-monitor")(calibrate_monitor_cmd)


def read_monitor_config(path: Path | None) -> dict | None:
    """A ``calibrate-monitor --out``/``--json`` file (or a bare monitor section), as JSON."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: must hold a JSON object")
    return doc


@handle_errors
def calibrate_monitor_cmd(
    model: Path = typer.Argument(..., help="ONNX classifier that will be deployed."),
    data: Path = typer.Option(..., "--data", help=".npz with x (and x_cal) for honest client streams, x_train for "
                              "the standardisation."),
    detectors: Path = typer.Option(None, "--detectors", help="OOD detector folder from `edgeward fit-ood` (the gate "
                                   "that ships); without it the gate-rejection signal is off."),
    target: float = typer.Option(0.01, "--target", help="False-flag rate allowed per honest client (all signals)."),
    clients: int = typer.Option(100, "--clients", min=1, help="Fresh honest and thief clients per stream kind "
                                "for the measured rates."),
    calibration_clients: int = typer.Option(None, "--calibration-clients", min=1,
                                            help="Honest calibration clients per stream kind (default 3x --clients)."),
    stream_length: int = typer.Option(200, "--stream-length", min=3, help="Queries per client stream."),
    seed: int = typer.Option(0, "--seed"),
    space: str = typer.Option("standardized", "--space", help="Distances on: standardized (inputs), input (raw), "
                              "features (the model's penultimate features output)."),
    out: Path = typer.Option(None, "--out", help="Write the calibration JSON here (for `edgeward package "
                             "--monitor-config`)."),
    json_out: bool = JSON_OPT,
) -> None:
    """Calibrate the PRADA extraction monitor (plus gate-rejection and label-entropy signals) on honest
    streams so at most --target of honest clients are flagged; measure it on fresh honest and thief streams."""
    from hardening.data import load_dataset
    from hardening.intake import load_model, make_session
    from hardening.prada_calibration import calibrate_model_monitor

    info = load_model(model)
    ds = load_dataset(data)
    scorer = None
    if detectors is not None:
        from runtime_guard.anomaly import AnomalyFormatError, AnomalyScorer

        try:
            scorer = AnomalyScorer.load(detectors)
        except (OSError, AnomalyFormatError) as e:
            raise InputError(f"{detectors}: detectors unreadable ({e})") from None
    r = calibrate_model_monitor(make_session(model), info, ds, scorer, target=target, clients_per_kind=clients,
                                calibration_clients_per_kind=calibration_clients, stream_length=stream_length,
                                seed=seed, min_queries_grid=(min(50, stream_length),), space=space)
    doc = r.to_dict()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(dumps(doc))
    if json_out:
        print_json(doc)
        return
    c = r.config
    table("calibrated extraction monitor", ["field", "value"],
          [("delta (Shapiro-Wilk W)", c["delta"]), ("min_queries", c["min_queries"]),
           ("max_rejection_rate", c["max_rejection_rate"]), ("min_label_entropy (bits)", c["min_label_entropy"]),
           ("standardised", c["center"] is not None)])
    table(f"measured on {r.clients_per_kind} fresh clients per kind (target {r.target:g})", ["stream", "flagged"],
          [*[(f"honest: {k}", v) for k, v in r.false_flag_rate.items()],
           *[(f"thief: {k}", v) for k, v in r.detection_rate.items()]])
    for n in r.notes:
        console.print(f"note: {n}", highlight=False)


def _csv(value: str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise InputError(f"--{what} is empty")
    return items


def _budgets(value: str) -> list[int]:
    try:
        out = [int(v) for v in _csv(value, "budgets") or []]
    except ValueError:
        raise InputError(f"--budgets must be comma-separated integers, got {value!r}") from None
    if any(b <= 0 for b in out):
        raise InputError(f"--budgets must be positive, got {value!r}")
    return out


def _hours(h: float | None) -> str:
    if h is None:
        return "not reached"
    if h == 0:
        return "unlimited"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.2f} h"


@handle_errors
def audit_extraction_cmd(
    model: Path = typer.Argument(..., help="ONNX classifier (the victim)."),
    data: Path = typer.Option(..., "--data", help=".npz with x/y (fidelity test set), x_thief (in_dist thief data), "
                              "x_train/x_cal (to fit the OOD gate)."),
    torch_source: Path = typer.Option(None, "--torch-source", help="Victim's PyTorch source: the thief copies its "
                                      "architecture (fresh weights)."),
    budgets: str = typer.Option("50,200,1000,5000", "--budgets", help="Query budgets, comma-separated."),
    quick: bool = typer.Option(False, "--quick", help="Quick profile: budgets 50,200,500."),
    scenarios: str = typer.Option(None, "--scenarios", help="Thief data: in_dist,natural_ood,noise (default), seed30_mixup (30 real seeds + mixup)."),
    policies: str = typer.Option(None, "--policies", help="Victims: bare,full,top_k,rounded,label_only,"
                                 "reverse_sigmoid,adaptive_misinformation,gate (OOD gate only),guarded (gate + PRADA monitor) (default all)."),
    attacks: str = typer.Option("copycat,knockoff_random", "--attacks",
                                help="copycat,knockoff_random,knockoff_adaptive; adaptive thieves (own pool, rounds): "
                                "active_uncertainty,jbda, dfme (data-free generator); "
                                "append +gate for gate-aware filtering (e.g. jbda+gate)."),
    rate_limit: str = typer.Option("60/minute", "--rate-limit", help="Per-key rate used for time-to-steal."),
    global_limit: str = typer.Option(None, "--global-limit", help="Global rate shared by all keys (Sybil bound)."),
    sybil_keys: int = typer.Option(10, "--sybil-keys", help="Keys a Sybil attacker spreads queries over."),
    thief_arch: str = typer.Option(None, "--thief-arch", help="Thief architecture from the zoo (default: victim's)."),
    train_steps: int = typer.Option(300, "--train-steps", min=1, help="Thief gradient steps per run."),
    monitor_config: Path = typer.Option(None, "--monitor-config", help="Calibrated extraction monitor for the "
                                        "guarded victim (`edgeward calibrate-monitor --out`; default: fixed PRADA)."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(None, "--out", help="Folder for extraction.json and fidelity-vs-queries PNGs."),
    executor: str = typer.Option("in-process", "--executor", help="Where grid cells run: in-process, ray (local "
                                 "cluster on 127.0.0.1) or ray://HOST:PORT; see docs/executor.md."),
    workers: int = typer.Option(None, "--workers", min=1, help="CPUs of the local Ray cluster (default: all)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the grid cells checkpointed in --out."),
    json_out: bool = JSON_OPT,
) -> None:
    """Steal the model with ART extraction attacks per scenario x defence x budget; report fidelity,
    queries to 90/95% fidelity, time to steal under the rate limit, and what each defence costs honest users.
    Exits 1 if the self-check (undefended model must be stealable) fails: then the harness is broken."""
    from attacks.thief_data import DEFAULT_SCENARIOS
    from hardening.executor import make_executor, parse_executor
    from hardening.extraction_audit import QUICK_BUDGETS, VICTIMS, run_extraction_audit

    if resume and out is None:
        raise InputError("--resume needs --out (the folder the interrupted run checkpointed its cells to)")
    parse_executor(executor)

    kw = dict(
        torch_source=torch_source,
        budgets=list(QUICK_BUDGETS) if quick else _budgets(budgets),
        scenarios=_csv(scenarios, "scenarios") or list(DEFAULT_SCENARIOS),
        policies=_csv(policies, "policies") or list(VICTIMS),
        attacks=_csv(attacks, "attacks"),
        rate_limit=rate_limit,
        global_limit=global_limit,
        sybil_keys=sybil_keys,
        thief_arch=thief_arch,
        train_steps=train_steps,
        seed=seed,
        plot_dir=out,
        monitor=read_monitor_config(monitor_config),
    )
    with progress_display("extraction", disable=json_out and not console.is_terminal) as update:

        def progress(done: int, total: int, label: str) -> None:
            update("extraction", label, done, total)

        sharded = executor != "in-process" or resume or out is not None
        runner = make_executor(executor, workers) if sharded else None
        try:
            report = run_extraction_audit(model, data, progress=progress, executor=runner,  # type: ignore[arg-type]
                                          checkpoint_dir=out, resume=resume, **kw)
        finally:
            if runner is not None:
                runner.close()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "extraction.json").write_text(dumps(report.to_dict()))
    if json_out:
        print_json(report.to_dict())
    else:
        _print(report)
    if report.self_check.passed is False:
        raise CheckFailed(f"self-check failed: {report.self_check.message}")


def _print(report) -> None:
    cols = ["scenario", "victim", "attack", *[str(b) for b in report.budgets], "q90", "q95",
            f"time to 90% (1 key @ {report.rate['per_client']})", f"{report.rate['sybil_keys']} keys", "PRADA flag"]
    rows = []
    for c in report.curves:
        rows.append([c.scenario, c.victim, c.attack, *c.fidelity, c.queries_to_90, c.queries_to_95,
                     _hours(c.hours_to_90_one_key), _hours(c.hours_to_90_sybil), c.first_flagged_at])
    table("fidelity of the stolen model vs queries", cols, rows)
    table("which defence stops which thief (vs the bare model, same data and attack)",
          ["scenario", "attack", "victim", "fidelity @max", "bare @max", "q90", "bare q90", "effect"],
          [[v.scenario, v.attack, v.victim, v.fidelity_at_max, v.bare_fidelity_at_max, v.queries_to_90,
            v.bare_queries_to_90, v.effect] for v in report.verdicts])
    table("cost for honest users (test split)", ["victim", "accuracy", "top-1 changed", "rejected", "flagged"],
          [[b.victim, b.accuracy, b.top1_changed, b.rejection_rate, b.flagged_rate] for b in report.benign])
    table("top-1 changed or blanked for honest users", ["source", "transform", "params", "test split", "OOD family"],
          [[p.source, p.name, json.dumps(p.params), p.top1_changed, p.top1_changed_ood]
           for p in report.postprocessors])
    if report.gate:
        console.print(f"OOD gate: target FRR {report.gate['alpha']}, held-out FRR {report.gate['heldout_frr']:.3f}",
                      highlight=False)
    sc = report.self_check
    verdict = "NOT RUN" if sc.passed is None else "PASS" if sc.passed else "FAIL"
    console.print(f"self-check {verdict}: {sc.message}", highlight=False)
    for p in report.plots:
        console.print(f"plot: {p}", highlight=False)
