"""Supervise N spawned waitress workers sharing one port: restart the dead, drain on SIGTERM.

Why not gunicorn's arbiter: it forks workers from the master, and the server
here is waitress, whose bounded connections (``api.connections``) are the
point of running it; gunicorn would replace that server with its own workers,
which bound neither slow headers per peer nor connections per address. So the
parent keeps the small loop gunicorn's arbiter is built on, with the same rules:

* a worker that exits is restarted after a backoff (0.5 s doubling to 10 s;
  reset once a worker has lived ``STABLE_S``), while the others keep serving
  (``SO_REUSEPORT`` stops routing to a dead worker's socket when it closes);
* a worker that cannot serve the bundle at start-up exits 2 with one line;
  during the initial start that stops the server with exit 2;
* SIGTERM / SIGINT to the parent sends SIGTERM to every worker, which drains
  its in-flight requests (``api.server._Drain``), then waits; stragglers are
  killed after ``drain_timeout_s`` plus a margin.

Workers are *spawned* (never forked): onnxruntime's thread pools do not
survive fork, and the parent never imports onnxruntime.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from .config import ApiConfig
from .server import ServerSettings, _announce, listen_socket, worker_main

log = logging.getLogger("api.supervisor")
BACKOFF_MIN_S, BACKOFF_MAX_S, STABLE_S = 0.5, 10.0, 30.0


@dataclass
class _Slot:
    index: int
    proc: Any = None
    ready: Any = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = BACKOFF_MIN_S
    restarts: int = 0


class Supervisor:
    def __init__(self, config: ApiConfig, settings: ServerSettings) -> None:
        self.config, self.settings = config, settings
        self.ctx = mp.get_context("spawn")
        self.slots = [_Slot(i) for i in range(settings.workers)]
        self.stopping = False
        self.port = 0
        self.errors = self.ctx.SimpleQueue()  # one-line start-up refusals from workers

    def _start(self, slot: _Slot) -> None:
        slot.ready = self.ctx.Event()
        slot.proc = self.ctx.Process(target=worker_main, name=f"edgeward-worker-{slot.index}",
                                     args=(self.config, self.settings, self.port, slot.ready,
                                           self.errors))
        slot.proc.start()
        slot.started_at = time.monotonic()
        slot.restart_at = None

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping = True

    def run(self) -> int:
        # Hold the port (bound, not listening: it never receives connections) so
        # port 0 resolves once and every worker joins the same reuseport group.
        holder = listen_socket(self.settings.host, self.settings.port, reuseport=True)
        self.port = holder.getsockname()[1]
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for slot in self.slots:
                self._start(slot)
            code = self._wait_initial()
            if code is not None:
                return code
            _announce(self.settings.host, self.port, self.settings.workers)
            while not self.stopping:
                self._tick(time.monotonic())
                time.sleep(0.1)
            return 0
        finally:
            self._stop_all()
            holder.close()
            for s, h in old.items():
                signal.signal(s, h)

    def _wait_initial(self) -> int | None:
        """Until every worker is serving; an exit code if one could not start."""
        while not self.stopping:
            for slot in self.slots:
                if not slot.proc.is_alive() and not slot.ready.is_set():
                    code = slot.proc.exitcode or 1
                    line = self._error_line()
                    if code == 2 and line is not None:  # the bundle cannot be served: one line
                        sys.stderr.write(f"error: {line}\n")
                        return 2
                    sys.stderr.write(f"edgeward: worker {slot.index} could not start (exit {code}); "
                                     "stopping\n")
                    return code
            if all(slot.ready.is_set() for slot in self.slots):
                return None
            time.sleep(0.05)
        return 0

    def _error_line(self) -> str | None:
        line = None
        while not self.errors.empty():
            got = self.errors.get()
            line = line or got
        return line

    def _tick(self, now: float) -> None:
        line = self._error_line()  # a restarted worker refused the bundle (e.g. replaced on disk)
        if line is not None:
            sys.stderr.write(f"edgeward: worker could not serve the bundle: {line}\n")
        for slot in self.slots:
            if slot.restart_at is None and not slot.proc.is_alive():
                lived = now - slot.started_at
                if lived >= STABLE_S:
                    slot.backoff = BACKOFF_MIN_S
                slot.restart_at = now + slot.backoff
                sys.stderr.write(f"edgeward: worker {slot.index} (pid {slot.proc.pid}) exited "
                                 f"({slot.proc.exitcode}) after {lived:.1f}s; restarting in "
                                 f"{slot.backoff:.1f}s\n")
                sys.stderr.flush()
                slot.backoff = min(BACKOFF_MAX_S, slot.backoff * 2)
            elif slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)

    def _stop_all(self) -> None:
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker drains
        deadline = time.monotonic() + self.settings.drain_timeout_s + 5
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
