"""``edgeward audit robustness``: worst-case robust accuracy per variant, threat model and epsilon."""

from __future__ import annotations

from pathlib import Path

import typer

from hardening.cli.common import JSON_OPT, console, dumps, handle_errors, out, print_json, progress_display, table
from hardening.errors import CheckFailed, InputError


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None or not text.strip():
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add ``audit robustness``."""

    @audit.command("robustness")
    @handle_errors
    def robustness(
        models: list[str] = typer.Argument(..., help="ONNX model files, or a variants.json from 'edgeward compress'."),
        data_path: Path = typer.Option(..., "--data", help=".npz with x (inputs) and y (labels)."),
        profile: str = typer.Option("quick", "--profile", help="quick (CI: few iterations) or thorough."),
        torch_source: Path | None = typer.Option(
            None, "--torch-source", help="PyTorch source of the float model (enables white-box, BPDA and transfer)."
        ),
        eps: str | None = typer.Option(
            None, "--eps", help="Comma-separated epsilons in input units (default: a grid that brackets where "
            "robust accuracy falls, from a minimal-perturbation probe; the report's eps_choice says how)."
        ),
        norm: str = typer.Option("inf", "--norm", help="Threat model: inf (L-inf) or 2 (L2)."),
        n: int = typer.Option(200, "--n", help="Evaluation points (a seeded sample of x)."),
        attacks: str | None = typer.Option(
            None, "--attacks", help="Comma-separated subset: fgsm,pgd,apgd-ce,apgd-dlr,apgd-t,deepfool,square,hsj."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed for sampling and attacks (runs are repeatable)."),
        out_dir: Path | None = typer.Option(None, "--out", help="Write robustness.json (with per-example results) here."),
        strict: bool = typer.Option(False, "--strict", help="Exit 1 when a self-check finding is 'high'."),
        self_checks: bool = typer.Option(
            True, "--self-checks/--no-self-checks", help="Sanity-epsilon and iteration checks (gradient checks always run)."
        ),
        executor: str = typer.Option(
            "in-process", "--executor", help="Where shards run: in-process, ray (local cluster on 127.0.0.1) or "
            "ray://HOST:PORT (join a cluster; workers must see the same file paths)."
        ),
        workers: int | None = typer.Option(None, "--workers", help="CPUs of the local Ray cluster (default: all)."),
        shard_points: int | None = typer.Option(
            None, "--shard-points", help="Evaluation points per shard (default 64); the same value gives the same "
            "result on every executor."
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Reuse the finished shards checkpointed in --out (from an interrupted run)."
        ),
        detectors: Path | None = typer.Option(
            None, "--detectors", help="Detectors dir from 'edgeward fit-ood': also attack through the anomaly gate "
            "with attackers who know it (guarded robust accuracy; the model must be the one the detectors were fitted for).",
        ),
        guarded_bundle: Path | None = typer.Option(
            None, "--guarded", help="Signed bundle (.ewb): attack through the gate and policy it ships instead of "
            "--detectors (needs --public-key and --key-file; the model must be the one it was packaged from).",
        ),
        public_key: Path | None = typer.Option(None, "--public-key", help="Pinned Ed25519 public key for --guarded."),
        key_file: Path | None = typer.Option(None, "--key-file", help="KEK file (0600) for --guarded."),
        guarded_n: int = typer.Option(64, "--guarded-n", help="Evaluation points for the adaptive (gate-aware) attacks."),
        guarded_seeds: int = typer.Option(1, "--guarded-seeds", min=1, help="Repeat the adaptive audit over this "
                                          "many seeds (seed, seed+1, ...): mean, min and max per epsilon."),
        json_out: bool = JSON_OPT,
    ) -> None:
        """Robust accuracy under the strongest attacks we can run, judged on each deployed ONNX model.

        Attacks run cheap to expensive on the points still classified correctly; a point is
        robust only if every attack failed. Self-checks flag broken attacks and gradient masking.
        """
        from hardening.executor import make_executor, parse_executor
        from hardening.robustness import run_robustness_audit

        eps_list = _floats(eps, "--eps")
        if resume and out_dir is None:
            raise InputError("--resume needs --out (the folder the interrupted run checkpointed its shards to)")
        if shard_points is not None and shard_points < 1:
            raise InputError(f"--shard-points must be a positive integer, got {shard_points}")
        if workers is not None and workers < 1:
            raise InputError(f"--workers must be a positive integer, got {workers}")
        parse_executor(executor)  # a bad spelling is a usage error before Ray starts
        runner = make_executor(executor, workers)
        if detectors is not None and guarded_bundle is not None:
            raise InputError("give --detectors or --guarded, not both")
        if guarded_bundle is not None and (public_key is None or key_file is None):
            raise InputError("--guarded needs --public-key and --key-file to verify and open the bundle")
        if detectors is not None or guarded_bundle is not None:
            from hardening.robustness.audit import resolve_models

            specs = resolve_models(models, torch_source)
            if len(specs) != 1:
                raise InputError(f"--detectors/--guarded attack one model; give exactly one model, not {len(specs)}")
        names = [a.strip() for a in attacks.split(",") if a.strip()] if attacks is not None else None
        with progress_display("robustness", disable=json_out and not console.is_terminal) as update:

            def progress(desc: str, done: int, total: int) -> None:
                update(desc.split(" ", 1)[0], desc, done, total)  # one task per model

            try:
                report = run_robustness_audit(
                    models, data_path, torch_source=torch_source, profile=profile, eps=eps_list, norm=norm, n=n,
                    seed=seed, attacks=names, progress=progress, self_checks=self_checks, executor=runner,
                    checkpoint_dir=out_dir, resume=resume, shard_points=shard_points,
                )
            finally:
                runner.close()
        data: dict | object = report
        guarded = []
        seeds_summary = None
        if detectors is not None or guarded_bundle is not None:
            from hardening.guarded_audit import multi_seed, run_guarded_audit, run_guarded_bundle_audit

            def one(s: int):
                kw = dict(torch_source=specs[0].torch_source, eps=eps_list, n=guarded_n, profile=profile, seed=s,
                          progress=None if json_out else (lambda m: console.print(f"[dim]guarded: {m}[/dim]")))
                if guarded_bundle is not None:
                    return run_guarded_bundle_audit(specs[0].path, data_path, guarded_bundle, public_key, key_file,
                                                    **kw)
                return run_guarded_audit(specs[0].path, data_path, detectors, **kw)

            runs: list = []

            def kept(s: int):
                runs.append(one(s))
                return runs[-1]

            seeds_summary = multi_seed(kept, tuple(range(seed, seed + guarded_seeds)))
            guarded = [r.to_dict() for r in runs]
            data = {**report.to_dict(), "guarded": guarded}
            if guarded_seeds > 1:
                data["guarded_seeds"] = seeds_summary
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "robustness.json").write_text(dumps(data) + "\n")
        if json_out:
            print_json(data)
        else:
            _print(report)
            for g in guarded[:1]:
                _print_guarded(g)
            if seeds_summary is not None and guarded_seeds > 1:
                table(f"Guarded robust accuracy over seeds {seeds_summary['seeds']} (n={seeds_summary['n']} each)",
                      ["eps", "guarded mean [min, max]", "bare mean [min, max]", "non-adaptive mean [min, max]"],
                      [[e["eps"], *(f"{e[k]['mean']:.3f} [{e[k]['min']:.3f}, {e[k]['max']:.3f}]" for k in
                                    ("guarded_robust_accuracy", "bare_robust_accuracy",
                                     "non_adaptive_guarded_accuracy"))] for e in seeds_summary["eps"]])
        if strict and report.worst_severity == "high":
            raise CheckFailed("self-checks raised high-severity findings (see above)")


def _print(report) -> None:
    fams = ["white-box", "bpda", "transfer", "black-box", "decision"]
    used = [f for f in fams if any(f in v.families for v in report.variants)]
    rows = []
    for v in report.variants:
        for e in v.eps:
            rows.append(
                [v.name, v.role, v.clean_accuracy, e.eps, *[e.robust_after_family.get(f) for f in used],
                 e.robust_accuracy, f"[{e.ci_low:.3f}, {e.ci_high:.3f}]"]
            )
    table(
        f"Robust accuracy, L{report.norm}, n={report.n}, profile={report.profile} (judged on the ONNX model)",
        ["variant", "role", "clean", "eps", *[f"after {f}" for f in used], "robust", "95% CI"],
        rows,
    )
    for v in report.variants:
        med = (f"> {max(report.eps):g} (most points unbroken)" if v.median_is_lower_bound
               else "-" if v.median_distance is None else f"{v.median_distance:.4g}")
        out.print(f"{v.name}: median smallest adversarial perturbation (L{report.norm}) {med}; {v.seconds:.1f} s")
        routes = ", ".join(f"{r['family']} <- {r['gradients']}" for r in v.gradient_routes) or "none"
        out.print(f"{v.name}: output {v.output_convention}; gradient routes: {routes}")
        if v.upper_bound:
            out.print(f"{v.name}: [bold red]UPPER BOUND[/bold red] robust accuracy is not reliable: {v.upper_bound_reason}")
    ex = report.execution
    if ex:
        out.print(f"executor: {ex['executor']} ({ex['workers']} workers), {len(ex['shards'])} shards "
                  f"({ex['resumed']} from checkpoints), {ex['shards_wall_s']:.1f} s")
    if report.findings:
        table("Self-check findings", ["severity", "variant", "code", "message"],
              [[f.severity, f.variant, f.code, f.message] for f in report.findings])
    else:
        out.print("self-checks: no findings")


def _print_guarded(g: dict) -> None:
    r = g["result"]
    table(
        f"Through the anomaly gate (L-inf, n={g['n']}, attackers who know the gate: {', '.join(g['attackers'])}; "
        f"clean accepted {r['clean_accepted']:.1%})",
        ["eps", "bare robust", "plain PGD then gate (non-adaptive)", "guarded robust (adaptive)", "found by"],
        [[e["eps"], e["bare_robust_accuracy"], e["non_adaptive_guarded_accuracy"], e["guarded_robust_accuracy"],
          ", ".join(f"{k} {v}" for k, v in e["found_by"].items())] for e in r["eps"]],
    )
    if g["white_box_skipped"]:
        out.print(f"[bold red]UPPER BOUND[/bold red] white-box adaptive attack not run: {g['white_box_skipped']}")
