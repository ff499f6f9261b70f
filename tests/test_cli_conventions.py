"""CLI conventions: a usage error is one ``error:`` line and exit 2; typer's shell
completion is available."""

from __future__ import annotations

import pytest

from servers import run_cli


@pytest.mark.parametrize("args,needle", [
    (["serve", "--bogus"], "No such option: --bogus"),
    (["serve", "x.ewb", "--public-key", "k", "--port", "abc"], "Invalid value for '--port'"),
    (["no-such-command"], "No such command"),
    (["serve"], "Missing option '--public-key'"),
])
def test_usage_errors_are_one_line(args, needle):
    out = run_cli(args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "--help" in lines[0] and out.stdout == ""


def test_shell_completion_is_offered():
    out = run_cli(["--help"])
    assert out.returncode == 0 and "--install-completion" in out.stdout
    script = run_cli(["--show-completion", "bash"])
    assert script.returncode == 0 and "complete" in script.stdout
