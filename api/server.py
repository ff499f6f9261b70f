"""Run the app under waitress, in one process or N processes sharing a port.

``workers > 1`` starts N *spawned* (not forked: onnxruntime thread pools and
locks do not survive fork) worker processes; each binds its own listening
socket to the same address with ``SO_REUSEPORT`` and the kernel spreads
connections across them. Every worker verifies and loads the bundle itself.

Rate limits are shared only through the storage URI: with ``memory://``
each worker counts on its own, so N workers allow N times the limit. The
runner warns about that, or refuses when ``require_shared_storage`` is set.

gunicorn works too (it forks after import, so keep ``preload_app`` off)::

    gunicorn -w 4 -b 127.0.0.1:8080 'api.wsgi:app'   # config from EDGEWARD_* env vars
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from .config import ApiConfig

log = logging.getLogger("api.server")


class ServerConfigError(ValueError):
    """The server settings are unsafe or inconsistent (e.g. memory storage with several workers)."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    threads: int = 4
    require_shared_storage: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ServerConfigError("workers must be between 1 and 64")
        if not 1 <= self.threads <= 256:
            raise ServerConfigError("threads must be between 1 and 256")
        if not 0 <= self.port <= 65535:
            raise ServerConfigError("port must be between 0 and 65535")


def check_storage(config: ApiConfig, settings: ServerSettings) -> str | None:
    """Warning text for per-process rate-limit storage with several workers
    (raises ServerConfigError instead when shared storage is required)."""
    if settings.workers > 1 and config.storage_uri.startswith("memory://"):
        msg = (f"{settings.workers} workers with storage {config.storage_uri}: each worker keeps its "
               f"own rate-limit counts, so clients get up to {settings.workers}x the limit; use "
               "--storage-uri redis://... to share them")
        if settings.require_shared_storage:
            raise ServerConfigError(msg)
        return msg
    return None


def listen_socket(host: str, port: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ServerConfigError("--workers > 1 needs SO_REUSEPORT (Linux/BSD); use gunicorn")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_waitress(app, sock: socket.socket, threads: int, max_body_bytes: int) -> None:
    """Serve ``app`` on a bound socket with edgeward's waitress settings (blocking).
    The benchmark's bare baseline uses this too, so both run the same server."""
    from waitress import serve as waitress_serve

    # Everything allocated so far (onnx, protobuf, numpy, the model) lives as long as the
    # process: move it out of the cyclic GC's sight so collections triggered by request
    # garbage do not re-scan it.
    gc.collect()
    gc.freeze()
    # waitress logs a WARNING for every request that waits for a free thread ("Task queue
    # depth is N"): with more keep-alive clients than threads that is every request, and
    # formatting + writing it costs more CPU than the guard. Backlog shows in latency metrics.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    sock.listen(1024)
    waitress_serve(
        app, sockets=[sock], threads=threads, ident="edgeward",
        # backstop only: Flask answers 413 as problem+json below this
        max_request_body_size=max(2 * max_body_bytes, 16 * 1024 * 1024),
        channel_timeout=30, connection_limit=1000, clear_untrusted_proxy_headers=True,
        _quiet=True,
    )


def _waitress(app, sock: socket.socket, settings: ServerSettings, config: ApiConfig) -> None:
    run_waitress(app, sock, settings.threads, config.max_body_bytes)


def _announce(host: str, port: int, workers: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"edgeward: serving on http://{shown}:{port} (workers={workers}, pid={os.getpid()})\n")
    sys.stderr.flush()


def _worker_main(config: ApiConfig, settings: ServerSettings, port: int) -> None:
    from . import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    app = create_app(config)
    sock = listen_socket(settings.host, port, reuseport=True)
    _waitress(app, sock, settings, config)


def serve(config: ApiConfig, settings: ServerSettings) -> int:
    """Blocking. Returns a process exit code."""
    warning = check_storage(config, settings)
    if warning:
        sys.stderr.write(f"edgeward: warning: {warning}\n")
    if settings.workers == 1:
        from . import create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        app = create_app(config)  # verifies the bundle before binding
        sock = listen_socket(settings.host, settings.port, reuseport=False)
        _announce(settings.host, sock.getsockname()[1], 1)
        try:
            _waitress(app, sock, settings, config)
        except KeyboardInterrupt:
            pass
        return 0
    return _serve_multi(config, settings)


def _serve_multi(config: ApiConfig, settings: ServerSettings) -> int:
    # Hold the port (bound, not listening: it never receives connections) so
    # port 0 resolves once and every worker joins the same reuseport group.
    holder = listen_socket(settings.host, settings.port, reuseport=True)
    port = holder.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(config, settings, port), name=f"edgeward-worker-{i}")
             for i in range(settings.workers)]
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for p in procs:
            p.start()
        _announce(settings.host, port, settings.workers)
        code = 0
        while not stopping:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                code = dead[0].exitcode or 1
                sys.stderr.write(f"edgeward: worker {dead[0].name} exited ({dead[0].exitcode}); stopping\n")
                break
            time.sleep(0.2)
        return code
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        holder.close()
        for s, h in old.items():
            signal.signal(s, h)
