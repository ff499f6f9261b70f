"""The import-linter contracts in pyproject.toml hold on the tree, and can fail.

Each planted test copies the four packages and pyproject.toml to a temporary
directory, adds one forbidden import and runs ``lint-imports`` there: it must exit
non-zero and name the broken contract. ``cli-on-top`` lists hardening's modules by
hand, so a test also checks that the list covers every module but the CLI. Benchmarks
are not packages import-linter sees: a test checks that none imports from tests/.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hardening", "attacks", "runtime_guard", "api")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contracts() -> dict[str, dict]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in cfg["contracts"]}


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} missing: install the dev extra (make install)")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy(tmp: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    return tmp


def _plant(tree: Path, module: str, line: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # planted on purpose\n")


def test_contracts_hold_on_the_tree(tmp_path):
    res = _lint(_copy(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    for c in _contracts().values():
        assert f"{c['name']} KEPT" in res.stdout, (c["name"], res.stdout)
    assert "0 broken" in res.stdout


@pytest.mark.parametrize(("module", "line", "contract", "names"), [
    ("attacks/evasion.py", "import hardening", "layers", "attacks.evasion -> hardening"),
    ("runtime_guard/guard.py", "import attacks.errors", "layers", "runtime_guard.guard -> attacks.errors"),
    ("api/app.py", "import attacks", "layers", "api.app -> attacks"),
    ("api/app.py", "import sklearn", "device-lean", "api.app -> sklearn"),
    ("runtime_guard/anomaly.py", "import torch", "device-lean", "runtime_guard.anomaly -> torch"),
    ("hardening/demo.py", "import api.app", "hardening-api", "hardening.demo -> api.app"),
    ("hardening/report/orchestrate.py", "import hardening.cli.common", "cli-on-top",
     "hardening.report.orchestrate -> hardening.cli.common"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, line, contract, names):
    tree = _copy(tmp_path)
    _plant(tree, module, line)
    res = _lint(tree)
    assert res.returncode != 0, res.stdout
    name = _contracts()[contract]["name"]
    assert f"{name} BROKEN" in res.stdout, res.stdout
    assert names in res.stdout, res.stdout


def test_cli_on_top_lists_every_hardening_module_but_the_cli():
    listed = set(_contracts()["cli-on-top"]["source_modules"])
    present = {f"hardening.{p.stem}" for p in (ROOT / "hardening").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem not in ("__init__", "__main__", "cli")}
    assert listed == present


def _imports_from_tests(source: str) -> list[str]:
    """Imports of a tests/ module, and sys.path entries naming tests/, in one file."""
    test_modules = {"tests", *(p.stem for p in (ROOT / "tests").glob("*.py"))}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in test_modules]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in test_modules:
            found.append(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and ast.unparse(node.func.value) == "sys.path" and "tests" in ast.unparse(node)):
            found.append(ast.unparse(node))
    return found


def test_no_benchmark_imports_from_tests():
    benches = sorted((ROOT / "benchmarks").glob("*.py"))
    assert benches
    bad = {p.name: hits for p in benches if (hits := _imports_from_tests(p.read_text()))}
    assert not bad, f"benchmarks import from tests/ (move what they need out of tests): {bad}"


@pytest.mark.parametrize("planted", [
    "from foreign_models import CNN3",
    "import servers",
    "from tests.foreign_models import train",
    "sys.path.insert(0, str(ROOT / 'tests'))",
])
def test_the_benchmark_check_can_fail(planted):
    assert _imports_from_tests(f"import sys\n{planted}\n")
