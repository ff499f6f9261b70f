"""Shared CLI plumbing: one error path, JSON or rich output, exit codes 0 / 1 / 2 / 3.

0 ok, 1 a check, policy or regression failed, 2 usage or input error, 3 internal error
(a bug in edgeward or a library: one line, the traceback only with ``--debug``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hardening.errors import EdgewardError
from hardening.jsonio import dumps

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 200)
F = TypeVar("F", bound=Callable[..., Any])

JSON_OPT = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")
INTERNAL_ERROR = 3


Update = Callable[[str, str, int, "int | None"], None]  # (task key, description, done, total)


@contextmanager
def progress_display(title: str, *, transient: bool = True, disable: bool = False) -> Iterator[Update]:
    """Progress of a long command on stderr: a rich bar per task on a terminal; elsewhere (CI
    logs, pipes) one plain line per task whenever its count moves, at most one a second per
    task, so a minutes-long audit is not silent until it ends. Yields ``update(key,
    description, done, total)``."""
    if disable:
        yield lambda key, desc, done, total: None
        return
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=transient) as bar:
            tasks: dict[str, Any] = {}

            def update(key: str, desc: str, done: int, total: int | None) -> None:
                if key not in tasks:
                    tasks[key] = bar.add_task(desc, total=total)
                bar.update(tasks[key], description=desc, completed=done, total=total)

            yield update
        return
    t0 = time.monotonic()
    last: dict[str, tuple[int, str, float]] = {}

    def log(key: str, desc: str, done: int, total: int | None) -> None:
        now, head = time.monotonic(), (desc.split() or [""])[0]  # a new stage always shows
        seen = last.get(key)
        if seen is not None and seen[1] == head and (seen[0] == done or (now - seen[2] < 1.0 and done != total)):
            return
        last[key] = (done, head, now)
        count = f"{done}/{total}" if total else str(done)
        console.print(f"{title} [{now - t0:6.0f} s] {count} {escape(desc)}", highlight=False, soft_wrap=True)

    yield log


class Settings:
    """Process-wide CLI flags set by the top-level callback."""

    debug = False


def error_line(message: str) -> None:
    """The one stderr line of a refused command (the message is text, never rich markup)."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def report_internal_error(exc: BaseException) -> int:
    """One line (or the traceback under --debug) for an exception nobody anticipated."""
    if Settings.debug:
        console.print_exception()
    else:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(f"[red]internal error:[/red] {escape(type(exc).__name__ + (': ' + msg if msg else ''))} "
                      "(a bug, not your input; rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
    return INTERNAL_ERROR


def handle_errors(fn: F) -> F:
    """Turn edgeward errors into a one-line message and their exit code (2 input, 1 check);
    anything else is an internal error (exit 3)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgewardError as e:
            error_line(str(e))
            raise typer.Exit(e.exit_code) from None
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # the command's own exit, or a usage error click reports (exit 2)
        except Exception as e:
            raise typer.Exit(report_internal_error(e)) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(dumps(data) + "\n")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    out.print(t)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    return "-" if v is None else str(v)
