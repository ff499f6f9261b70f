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
    """typer detects the calling shell from the process tree, so ask from under bash."""
    import shlex
    import subprocess
    import sys

    from servers import REPO, _env

    out = run_cli(["--help"])
    assert out.returncode == 0 and "--install-completion" in out.stdout and "--show-completion" in out.stdout
    cmd = f"{shlex.quote(sys.executable)} -m hardening --show-completion; exit $?"
    script = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "complete" in script.stdout, script.stderr
