"""Every ``edgeward`` command written in docs/*.md names a real command and real options.

The README's commands run end to end (tests/test_docs.py); the reference pages hold many more
examples, whose full runs would take far too long. This test holds them to the CLI itself: the
command path must exist and every ``--option`` must be one that command accepts, so a renamed
or removed flag cannot survive in the docs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from hardening.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_START = re.compile(r"^\s*(?:\$ )?(?:\S*/)?edgeward\s")


def doc_commands(text: str) -> list[str]:
    """``edgeward ...`` lines of the fenced code blocks, continuations joined, comments dropped."""
    out = []
    for block in _FENCE.findall(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            i += 1
            if not _START.match(line):
                continue
            while line.rstrip().endswith("\\") and i < len(lines):
                line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
            out.append(line.split(" #", 1)[0].strip())
    return out


def _tokens(cmd: str) -> list[str]:
    cmd = re.sub(r'"\$\(.*?\)"', "VALUE", cmd)  # "$(edgeward select ...)" stands for one value
    cmd = cmd.replace("[", " ").replace("]", " ")  # [--json]: optional, still a real option
    toks = shlex.split(cmd)
    start = next(i for i, t in enumerate(toks) if t.endswith("edgeward"))
    return [t for t in toks[start + 1:] if t != "..."]


def check_command(root, cmd: str) -> list[str]:
    """Problems of one documented command line (empty: it fits the CLI). Typer's command objects
    are read by their public attributes (``commands``, ``params``, ``opts``)."""
    toks = _tokens(cmd)
    node = root
    path = []
    while hasattr(node, "commands") and toks and not toks[0].startswith("-"):
        sub = node.commands.get(toks[0])
        if sub is None:
            if "full" in node.commands:  # `edgeward audit MODEL ...` is `audit full` (hardening.cli.AuditGroup)
                node, path = node.commands["full"], path + ["full"]
                break
            return [f"no command {' '.join(path + [toks[0]])!r}"]
        node, path = sub, path + [toks.pop(0)]
    if hasattr(node, "commands"):
        return [f"{' '.join(path) or 'edgeward'} needs a subcommand"]
    opts = {o: p for p in node.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
    opts["--help"] = None
    problems, i = [], 0
    while i < len(toks):
        t = toks[i]
        i += 1
        if not t.startswith("--"):
            continue
        name, has_value = t.split("=", 1)[0], "=" in t
        if name not in opts:
            problems.append(f"{' '.join(path)}: no option {name}")
            continue
        p = opts[name]
        if p is not None and not p.is_flag and not has_value:
            i += 1  # its value
    return problems


ROOT = typer.main.get_command(app)
CASES = [(doc.name, cmd) for doc in DOCS for cmd in doc_commands(doc.read_text())]


def test_docs_hold_commands():
    assert len(CASES) >= 40, len(CASES)  # the parser still finds the examples
    assert {name for name, _ in CASES} >= {"api.md", "extraction.md", "updates.md", "harden.md", "report.md"}


@pytest.mark.parametrize(("doc", "cmd"), CASES, ids=[f"{d}:{i}" for i, (d, _) in enumerate(CASES)])
def test_documented_command_fits_the_cli(doc, cmd):
    assert check_command(ROOT, cmd) == [], f"{doc}: {cmd}"


def test_checker_catches_wrong_commands_and_options():
    assert check_command(ROOT, "edgeward package r.json --calibrate-monitor 0.01 --monitor-space features") == []
    assert check_command(ROOT, "edgeward package r.json --space features") == ["package: no option --space"]
    assert check_command(ROOT, "edgeward audit robustness m.onnx --epsilon 0.1") == ["audit robustness: no option --epsilon"]
    assert check_command(ROOT, "edgeward serv m.ewb") == ["no command 'serv'"]
    assert check_command(ROOT, "edgeward repo") == ["repo needs a subcommand"]
    # an option's value is not read as an option, a flag takes none
    assert check_command(ROOT, "edgeward audit m.onnx --data d.npz --json --out o") == []
