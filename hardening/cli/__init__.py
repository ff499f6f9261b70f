"""The ``edgeward`` command. Each area registers its commands from its own module."""

from __future__ import annotations

import typer

from hardening.cli import bundle, extraction, foundation, ood, report, robustness, serve

app = typer.Typer(
    name="edgeward",
    help="Edge security and robustness hardening for on-device ML models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
audit_app = typer.Typer(help="Security audits: robustness, extraction, OOD.", no_args_is_help=True)

for _module in (foundation, robustness, extraction, ood, bundle, serve, report):
    _module.register(app, audit_app)

app.add_typer(audit_app, name="audit")


def main() -> None:
    app()
