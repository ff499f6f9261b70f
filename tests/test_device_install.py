"""The device install: the built wheel with no extras, in a fresh venv, pinned by the lock.

It must serve a signed bundle, verify and inspect it, make keys, and refuse every
release-time command in one line with exit 2 naming ``edgeward[audit]``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from api_fixtures import api_env, bundle_v1, json_body  # noqa: F401 (fixtures)
from servers import ServerProcess

REPO = Path(__file__).resolve().parent.parent
RELEASE_TIME = [
    ["demo-model", "--out", "m"],
    ["compress", "model.onnx", "--data", "d.npz", "--out", "v"],
    ["profile", "v/variants.json", "--data", "d.npz"],
    ["harden", "model.onnx", "--torch-source", "m.pt", "--data", "d.npz", "--recipe", "adv_pgd", "--out", "h"],
    ["audit", "model.onnx", "--data", "d.npz", "--out", "r"],
    ["audit", "robustness", "v/variants.json", "--data", "d.npz"],
    ["fit-ood", "model.onnx", "--data", "d.npz", "--out", "o"],
    ["gate", "r/report.json", "--baseline", "r/report.json"],
    ["package", "r/report.json", "--out", "b.ewb", "--version", "1", "--signing-key", "k"],
]


def _sh(argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    """Wheel built from a copy of the sources (the tree stays clean), installed with no extras."""
    root = tmp_path_factory.mktemp("device")
    src = root / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    for pkg in ("hardening", "attacks", "runtime_guard", "api"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    r = _sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root / "dist"), str(src)], root)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((root / "dist").glob("edgeward-*.whl"))
    venv = root / "venv"
    r = _sh([sys.executable, "-m", "venv", str(venv)], root)
    assert r.returncode == 0, r.stderr
    r = _sh([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(REPO / "requirements.lock"),
             str(wheel)], root)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def test_device_install_has_no_release_time_libraries(device_venv):
    r = _sh([str(device_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"], device_venv)
    names = {p["name"].lower() for p in json.loads(r.stdout)}
    assert "edgeward" in names and "onnxruntime" in names
    assert not names & {"torch", "adversarial-robustness-toolbox", "scikit-learn", "scipy", "matplotlib"}
    r = _sh([str(device_venv / "bin" / "python"), "-m", "pip", "check"], device_venv)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("argv", RELEASE_TIME, ids=lambda a: " ".join(a[:2]))
def test_release_time_commands_say_they_need_the_audit_extra(device_venv, tmp_path, argv):
    r = _sh([str(device_venv / "bin" / "edgeward"), *argv], tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "edgeward[audit]" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_device_install_serves_verifies_and_inspects(device_venv, api_env, bundle_v1, tmp_path):
    ew = str(device_venv / "bin" / "edgeward")
    assert _sh([ew, "--version"], tmp_path).stdout.startswith("edgeward ")
    r = _sh([ew, "keygen", "--out", "keys"], tmp_path)
    assert r.returncode == 0 and (tmp_path / "keys" / "kek.key").is_file(), r.stderr
    secrets = ["--public-key", str(api_env.public_key_path), "--key-file", str(api_env.kek_path)]
    for argv in (["verify", str(bundle_v1), *secrets, "--json"],
                 ["inspect", str(bundle_v1), "--public-key", str(api_env.public_key_path), "--json"]):
        r = _sh([ew, *argv], tmp_path)
        assert r.returncode == 0, r.stderr
        json.loads(r.stdout)
    srv = ServerProcess(api_env.serve_args(bundle_v1), tmp_path / "serve.log", executable=[ew], cwd=tmp_path)
    with srv:
        assert requests.get(srv.url + "/readyz", timeout=5).status_code == 200
        r = requests.post(srv.url + "/v1/predict", data=json_body(api_env.x[:2]),
                          headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 200 and r.json()["labels"] == api_env.labels[:2].tolist(), r.text


def test_device_install_without_the_fleet_extra_refuses_update_from_in_one_line(device_venv, api_env, tmp_path):
    ew = str(device_venv / "bin" / "edgeward")
    r = _sh([str(device_venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('tuf'))"], tmp_path)
    assert r.stdout.strip() == "None"  # the fleet extra is not part of the device install
    secrets = ["--public-key", str(api_env.public_key_path), "--key-file", str(api_env.kek_path)]
    for argv in (["serve", *secrets, "--update-from", "http://127.0.0.1:9", "--state-dir", "s", "--device-id", "d"],
                 ["update", "--from", "http://127.0.0.1:9", "--state-dir", "s", "--device-id", "d",
                  "--public-key", str(api_env.public_key_path)]):
        r = _sh([ew, *argv], tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "edgeward[fleet]" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
