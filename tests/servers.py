"""Real processes for integration tests: the edgeward server and redis-server.

Both bind 127.0.0.1 on a free port, are waited on until they answer, and are
stopped by pid (never by name). Output goes to a log file that is included
in the failure message if start-up fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
CLI = ["-m", "hardening"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """``edgeward serve ...`` in a subprocess; ``url`` once started."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None,
                 executable: list[str] | None = None, cwd: Path | None = None) -> None:
        """``executable``: another installed ``edgeward`` (then the source tree is kept off
        PYTHONPATH so that install is what runs); default this interpreter on the tree."""
        self.executable = executable or [sys.executable, *CLI]
        self.cwd = cwd or REPO
        self.env = _env() if executable is None else {k: v for k, v in _env().items() if k != "PYTHONPATH"}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.args = ["serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0, wait_ready: bool = True) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*self.executable, *self.args], cwd=self.cwd, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        path = "/readyz" if wait_ready else "/healthz"
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """The last 4000 characters of the server's output without its access-log lines
        (one JSON object per request; read ``log_path`` for those)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith('{"time":'))[-4000:]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: server + its workers
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def keyed_server(api_env: Any, bundle: Path, workdir: Path, *key_names: str,
                 extra: tuple[str, ...] = ()) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    """``edgeward serve BUNDLE --api-keys`` with one API key per name (a fresh keys file in
    ``workdir``): yields the started server and ``{name: key}``, and on the way out stops
    it and fails the test if it logged a traceback."""
    from api.auth import add_key

    keys = {name: add_key(workdir / "keys.json", name) for name in key_names}
    srv = ServerProcess(api_env.serve_args(bundle, "--api-keys", str(workdir / "keys.json"), *extra),
                        workdir / "server.log").start()
    try:
        yield srv, keys
    finally:
        srv.stop()
    assert "Traceback" not in srv.log(), srv.log()


def run_cli(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``edgeward <args>`` in a subprocess (for exit codes and messages)."""
    return subprocess.run([sys.executable, *CLI, *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only, its own port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
