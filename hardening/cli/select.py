"""``edgeward select``: the deployable variant of a report, on its security-aware Pareto front."""

from __future__ import annotations

from pathlib import Path

import typer

from hardening.cli.common import JSON_OPT, handle_errors, out, print_json, table


def register(app: typer.Typer, audit: typer.Typer) -> None:
    app.command("select")(select_cmd)


@handle_errors
def select_cmd(
    report: Path = typer.Argument(..., help="report.json from `edgeward audit MODEL --variants DIR/variants.json`."),
    policy: Path = typer.Option(None, "--policy", help="Judge by this policy TOML instead of the report's own."),
    best: str = typer.Option("size_kb", "--best", help="Objective to optimise among qualifying variants: size_kb "
                             "(default), latency_p95_ms, memory_mb (lowest) or clean_accuracy, robust_accuracy, "
                             "queries_to_steal (highest)."),
    name_only: bool = typer.Option(False, "--name-only", help="Print only the chosen variant's name."),
    json_out: bool = JSON_OPT,
) -> None:
    """Pick the variant that passes every policy check, has a trusted robust figure and is on the
    Pareto front, best on --best. Exit 1 if none qualifies. Package it with
    `edgeward package REPORT --variant NAME ...`."""
    from hardening.pareto import candidates, select
    from hardening.report import load_policy, load_report, rejudge

    rep = load_report(report)
    if policy is not None:
        rep = rejudge(rep, load_policy(policy))
    cands, eps = candidates(rep)
    chosen = select(cands, best)
    if json_out:
        print_json({"selected": chosen.name if chosen else None, "best": best, "eps": eps,
                    "policy": str(policy) if policy else "the report's", "candidates": [c.to_dict() for c in cands]})
    elif name_only:
        if chosen:
            out.print(chosen.name, highlight=False)
    else:
        table(f"candidates ({report})", ["variant", "recipe", "parent", "clean", "robust", "p95 ms", "KiB", "MB",
                                        "queries to steal", "front", "policy"],
              [(c.name, c.recipe or c.kind, c.parent, *c.metrics.values(), "yes" if c.on_front else "",
                "pass" if c.passed else "fail") for c in cands])
        out.print(f"selected: {chosen.name}" if chosen else "[red]no variant satisfies the policy[/red]",
                  highlight=False)
    if chosen is None:
        raise typer.Exit(1)
