"""The device runtime and the API must not drag in torch, ART or scikit-learn.

The probe imports *every* module of ``runtime_guard`` and ``api`` (walked, not listed, so a
new module is covered the day it is added) and lists the heavy modules that ended up
loaded. ``test_probe_fails_when_an_app_module_imports_sklearn`` plants such an import in
a copy of ``api/app.py`` and shows the probe then fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "art", "sklearn", "scipy", "hardening", "attacks")

PROBE = """
import importlib, json, pkgutil, sys
import runtime_guard, api
names = []
for pkg in (runtime_guard, api):
    names.append(pkg.__name__)
    names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
heavy = %r
print(json.dumps({"modules": names,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy)}))
"""


def _probe(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", PROBE % (HEAVY,)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runtime_and_api_imports_are_lean():
    res = _probe(ROOT)
    assert {"api.app", "api.server", "api.routes.v2", "runtime_guard.guard", "runtime_guard.bundle.reader"} <= set(
        res["modules"]), res["modules"]
    assert res["heavy"] == [], f"heavy modules imported: {res['heavy']}"


def test_probe_fails_when_an_app_module_imports_sklearn(tmp_path):
    for pkg in ("runtime_guard", "api"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    app = tmp_path / "api" / "app.py"
    app.write_text(app.read_text() + "\nimport sklearn  # planted on purpose\n")
    assert "sklearn" in _probe(tmp_path)["heavy"]
