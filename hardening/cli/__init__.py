"""The ``edgeward`` command. Each area registers its commands from its own module."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from hardening.cli import bundle, extraction, fleet, foundation, harden, ood, report, robustness, select, serve
from hardening.cli.common import Settings, error_line, report_internal_error
from hardening.cli.extras import release_time_refusal, version

app = typer.Typer(
    name="edgeward",
    help="Edge security and robustness hardening for on-device ML models.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (typer's, for bash/zsh/fish)
    pretty_exceptions_enable=False,
)


class AuditGroup(TyperGroup):
    """``edgeward audit MODEL --data ...`` (MODEL an existing file or ``*.onnx``) runs the full
    review (the ``full`` subcommand); a mistyped subcommand still gets "No such command";
    ``edgeward audit robustness|extraction|ood ...`` still reach the single-area audits."""

    def parse_args(self, ctx, args):  # type: ignore[no-untyped-def]
        first = args[0] if args else ""
        if first not in self.commands and "full" in self.commands and (first.endswith(".onnx") or os.path.isfile(first)):
            args = ["full", *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=AuditGroup,
    help="Security audits. `edgeward audit MODEL --data D --out DIR` runs the full review; "
    "subcommands run one area.",
    no_args_is_help=True,
)

def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edgeward {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an internal error (exit 3)."),
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Exit codes: 0 ok, 1 a check/policy/regression failed, 2 usage or input error, 3 internal error."""
    Settings.debug = debug
    refusal = release_time_refusal(ctx.invoked_subcommand or "")
    if refusal:
        error_line(refusal)
        raise typer.Exit(2)


for _module in (foundation, harden, robustness, extraction, ood, bundle, fleet, serve, report, select):
    _module.register(app, audit_app)

app.add_typer(audit_app, name="audit")


def main() -> None:
    """Click's own handling, except that a usage error (unknown option, bad value,
    missing argument) is one ``error:`` line on stderr and exit 2, as grep and
    curl do, instead of a boxed panel: scripts and logs read it in one line."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's (vendored) click: ClickException, UsageError, ...
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        sys.stderr.write(f"error: {exc.format_message()}{hint}\n")
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except typer.Abort:
        sys.stderr.write("aborted\n")
        raise SystemExit(1) from None
    except Exception as exc:  # escaped every command's handler (e.g. raised while parsing)
        raise SystemExit(report_internal_error(exc)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
