"""The device runtime and the API must not drag in torch, ART or scikit-learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "art", "sklearn", "scipy", "hardening", "attacks")

PROBE = """
import json, sys
import runtime_guard, api
from runtime_guard import GuardedModel, GuardConfig, SanitizerError
import runtime_guard.guard, runtime_guard.anomaly, runtime_guard.bundle, runtime_guard.admission
import runtime_guard.telemetry, runtime_guard.extraction_monitor, runtime_guard.output_policy
heavy = %r
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def test_runtime_and_api_imports_are_lean():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"heavy modules imported: {loaded}"


def test_probe_can_fail():
    """The same probe does report a heavy module once something imports it (no vacuous pass)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = PROBE.replace("import runtime_guard, api", "import runtime_guard, api, sklearn")
    out = subprocess.run(
        [sys.executable, "-c", probe % (HEAVY,)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "sklearn" in json.loads(out.stdout.strip().splitlines()[-1])
