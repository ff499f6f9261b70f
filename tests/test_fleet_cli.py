"""docs/updates.md's walkthrough, run as written (edgeward subprocesses, http.server on 127.0.0.1),
and the CLI's answers to bad input."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fleet_fixtures import StaticServer, attested_bundle

from runtime_guard.bundle import write_secret_file

from api_fixtures import api_env  # noqa: F401
from servers import REPO, _env


def _block() -> list[str]:
    text = (REPO / "docs" / "updates.md").read_text()
    block = re.search(r"## Walkthrough\n\n```bash\n(.*?)```", text, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def _run(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    assert argv[0] == "edgeward", cmd
    return subprocess.run([sys.executable, "-m", "hardening", *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_updates_walkthrough_runs_as_written(api_env, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(api_env.public_key_path, keys / "signing.pub.pem")
    write_secret_file(keys / "kek.key", api_env.kek.hex().encode())
    attested_bundle(api_env, tmp_path / "model-v1.ewb", 1)
    attested_bundle(api_env, tmp_path / "model-v2.ewb", 2)
    env = _env()
    http = None
    outputs = {}
    try:
        for line in _block():
            if line.startswith("export "):
                name, _, value = line[len("export "):].split("#")[0].strip().partition("=")
                env[name] = value
                continue
            if line.startswith("python -m http.server"):
                http = StaticServer(tmp_path / "repo", tmp_path / "http.log").start()
                continue
            cmd = line.replace("http://127.0.0.1:8000", http.url) if http else line
            r = _run(cmd, tmp_path, env)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
            outputs[shlex.split(cmd)[1] + " " + shlex.split(cmd)[2]] = r.stdout
    finally:
        if http is not None:
            http.stop()
    releases = json.loads(outputs["repo releases"])
    assert [r["version"] for r in releases] == [2, 1]
    assert releases[0]["rollout"]["percentage"] == 25 and releases[0]["attestation"]
    upd = json.loads(outputs["update --from"])["release"]
    # device-042 is outside the 25% cohort: it gets v1, fully verified
    from runtime_guard.update.cohort import in_cohort

    assert upd["version"] == (2 if in_cohort("device-042", "stable", 25) else 1)
    assert upd["bundle_verified"] is True and upd["attested"] is True
    assert list((tmp_path / "repo-keys" / "revoked").glob("*.pem"))  # rotated targets keys


def test_key_wrapping_walkthrough_runs_as_written(api_env, tmp_path):
    from runtime_guard.bundle import generate_kek, write_bundle
    from runtime_guard.bundle.recipients import load_device_key, open_for

    text = (REPO / "docs" / "updates.md").read_text()
    block = re.search(r"## Per-device key wrapping.*?```bash\n(.*?)```", text, re.S).group(1)
    cmds = [c.split("  #")[0].strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(api_env.public_key_path, keys / "signing.pub.pem")
    kek = generate_kek()
    write_secret_file(tmp_path / "release-kek.key", kek.hex().encode())
    write_bundle(tmp_path / "model-v3.ewb", {"model": api_env.model_bytes},
                 {"model": {"name": "digits"}, "runtime": api_env.runtime(), "smoke_test": api_env.golden()},
                 api_env.signing_key, kek, 3)
    env = _env()
    for cmd in cmds:
        if shlex.split(cmd)[1] == "serve":
            continue
        r = _run(cmd, tmp_path, env)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    doc = (tmp_path / "model-v3.ewb.recipients.json").read_bytes()
    digest = json.loads(doc)["manifest_sha256"]
    for i in (1, 2):
        assert open_for(doc, f"device-00{i}", load_device_key(tmp_path / f"dev{i}" / "device.key"), digest).secret == kek


def test_cli_refusals_are_one_line_exit_2(api_env, tmp_path):
    env = _env()
    env.pop("EDGEWARD_REPO_PASSPHRASE", None)
    r = _run("edgeward repo init --repo r --keys k", tmp_path, env)
    assert r.returncode == 2 and "EDGEWARD_REPO_PASSPHRASE" in r.stderr, r.stderr
    env["EDGEWARD_REPO_PASSPHRASE"] = "x"
    r = _run("edgeward publish missing.ewb --repo r --keys k", tmp_path, env)
    assert r.returncode == 2 and "missing.ewb" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _run(f"edgeward serve --public-key {api_env.public_key_path} --key-file {api_env.kek_path} "
             "--update-from http://127.0.0.1:9", tmp_path, env)
    assert r.returncode == 2 and "--state-dir and --device-id" in r.stderr, r.stderr
    r = _run(f"edgeward update --from ftp://x --state-dir s --device-id d --public-key {api_env.public_key_path}",
             tmp_path, env)
    assert r.returncode == 2 and "http" in r.stderr, r.stderr
