"""Fleet-update test parts: a TUF repository (hardening.fleet) served by python's
http.server in a subprocess on 127.0.0.1, and bundles with their attestations."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from servers import free_port

pytest.importorskip("tuf")

PASSPHRASE = "repo-passphrase-for-tests"


class StaticServer:
    """``python -m http.server`` over ``directory`` (plain files, nothing TUF-aware)."""

    def __init__(self, directory: Path, log_path: Path) -> None:
        self.directory, self.port = Path(directory), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StaticServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(self.directory)], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                requests.get(self.url + "/", timeout=1)
                return self
            except requests.RequestException:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("http.server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None:
            self._log.close()

    def __enter__(self) -> "StaticServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def attested_bundle(api_env, path: Path, version: int, *, model_bytes: bytes | None = None,
                    passed: bool = True, report_digest: str = "ab" * 32) -> Path:
    """A signed bundle (report_digest in the manifest) and its in-toto attestation beside it."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from runtime_guard.bundle import write_bundle
    from runtime_guard.update import attestation

    payloads = {"model": model_bytes if model_bytes is not None else api_env.model_bytes}
    fields = {"model": {"name": "digits"}, "runtime": api_env.runtime(), "smoke_test": api_env.golden(),
              "report_digest": report_digest, "forced": not passed}
    write_bundle(path, payloads, fields, api_env.signing_key, api_env.kek, version)
    sk = load_pem_private_key(api_env.signing_key, None)

    stmt = attestation.statement(path.name, hashlib.sha256(path.read_bytes()).hexdigest(), report_digest,
                                 {"passed": passed, "forced": not passed, "failed_checks": [] if passed else ["x"]})
    path.with_name(path.name + ".intoto.json").write_bytes(attestation.sign(stmt, sk))
    return path


def new_repo(root: Path, **thresholds: int):
    from hardening.fleet import Repository

    return Repository.init(root / "repo", root / "keys", PASSPHRASE.encode(), thresholds=thresholds or None)


def snapshot_repo(repo_dir: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(repo_dir, dest)
    return dest


def serve_copy(src: Path, served: Path) -> None:
    """Make the served directory an exact copy of ``src`` (what an attacker on the path serves)."""
    for sub in ("metadata", "targets"):
        if (served / sub).exists():
            shutil.rmtree(served / sub)
        shutil.copytree(src / sub, served / sub)
