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


def test_long_commands_show_progress_in_a_log(digits_demo):
    """Off a terminal (a CI log) an audit prints plain progress lines on stderr as it goes;
    stdout keeps only the result."""
    import re

    out = run_cli(["audit", "robustness", digits_demo.model_path, "--data", digits_demo.data_path,
                   "--n", "16", "--attacks", "fgsm,pgd", "--eps", "0.1", "--json"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.lstrip().startswith("{")
    # --json off a terminal: the JSON consumer gets no progress noise
    assert not re.search(r"^robustness \[", out.stderr, re.M), out.stderr
    out = run_cli(["audit", "robustness", digits_demo.model_path, "--data", digits_demo.data_path,
                   "--n", "16", "--attacks", "fgsm,pgd", "--eps", "0.1"])
    assert out.returncode == 0, out.stderr
    lines = re.findall(r"^robustness \[\s*\d+ s\] (\d+)/(\d+) (.+)$", out.stderr, re.M)
    assert len(lines) >= 2 and any(d == t for d, t, _ in lines), out.stderr


def test_plain_progress_prints_each_count_once_and_every_new_stage(capsys):
    from hardening.cli.common import progress_display

    with progress_display("audit") as update:
        for _ in range(3):
            update("audit", "robustness float", 1, 5)  # the same count: one line
        update("audit", "ood fitting", 1, 5)  # a new stage at the same count: a line
        update("audit", "ood fitting", 5, 5)  # the end always shows
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == ["1/5 robustness float", "1/5 ood fitting", "5/5 ood fitting"]
