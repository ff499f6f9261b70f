"""Run the app under waitress, in one process or N processes sharing a port.

``workers > 1`` starts N *spawned* (not forked: onnxruntime thread pools and
locks do not survive fork) worker processes; each binds its own listening
socket to the same address with ``SO_REUSEPORT`` and the kernel spreads
connections across them. Every worker verifies and loads the bundle itself.
``api.supervisor`` restarts a worker that dies (with backoff) while the
others keep serving, and SIGTERM drains every worker (see ``_Drain``).

Rate limits are shared only through the storage URI: with ``memory://``
each worker counts on its own, so N workers allow N times the limit. The
runner warns about that, or refuses when ``require_shared_storage`` is set.

gunicorn works too (it forks after import, so keep ``preload_app`` off)::

    gunicorn -w 4 -b 127.0.0.1:8080 'api.wsgi:app'   # config from EDGEWARD_* env vars
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ApiConfig
from .connections import BoundedListener, ConnectionLimits, ConnectionTable

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication
    from flask import Flask

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
    header_timeout_s: float = 10.0  # whole request-header block, however slowly it trickles
    max_connections: int = 1000  # per worker
    max_connections_per_peer: int = 64  # per client address, per worker
    connection_reserve: int = 50  # slots only addresses holding no connection may take
    drain_timeout_s: float = 10.0  # SIGTERM: longest wait for in-flight requests
    grpc_port: int | None = None  # OIP v2 over gRPC on host:grpc_port (needs edgeward[grpc])

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ServerConfigError("workers must be between 1 and 64")
        if not 1 <= self.threads <= 256:
            raise ServerConfigError("threads must be between 1 and 256")
        if not 0 <= self.port <= 65535:
            raise ServerConfigError("port must be between 0 and 65535")
        if self.grpc_port is not None:
            if not 0 <= self.grpc_port <= 65535:
                raise ServerConfigError("grpc port must be between 0 and 65535")
            if self.grpc_port == 0 and self.workers > 1:
                raise ServerConfigError("--grpc-port 0 cannot be shared by several workers; give a port")
            if self.grpc_port != 0 and self.grpc_port == self.port:
                raise ServerConfigError("the gRPC and HTTP ports must differ")
        if not 0 <= self.drain_timeout_s <= 3600:
            raise ServerConfigError("drain timeout must be between 0 and 3600 seconds")
        try:
            self.connection_limits()
        except ValueError as exc:
            raise ServerConfigError(str(exc)) from None

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.header_timeout_s, self.max_connections,
                                self.max_connections_per_peer, self.connection_reserve)


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


def run_waitress(app: WSGIApplication, sock: socket.socket, threads: int, max_body_bytes: int,
                 limits: ConnectionLimits | None = None, *,
                 on_drain: Callable[[], None] | None = None, drain_timeout_s: float = 10.0) -> None:
    """Serve ``app`` on a bound socket with edgeward's waitress settings (blocking).
    The benchmark's bare baseline uses this too, so both run the same server.

    Connections go through ``api.connections`` (header deadline, per-peer caps).
    In the main thread SIGTERM drains: stop accepting, call ``on_drain`` (readiness
    turns 503), wait until no request is in progress (at most ``drain_timeout_s``),
    then return."""
    from waitress.server import create_server

    limits = limits or ConnectionLimits()
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
    table = ConnectionTable(limits)
    listener = BoundedListener.wrap(sock, table)
    server = create_server(
        app, sockets=[listener], threads=threads, ident="edgeward",
        # backstop only: Flask answers 413 as problem+json below this
        max_request_body_size=max(2 * max_body_bytes, 16 * 1024 * 1024),
        # our listener enforces the real cap (with per-peer shares and a reserve); waitress's
        # own limit sits above it so it never stops accepting first
        channel_timeout=30, connection_limit=limits.max_total + 16,
        clear_untrusted_proxy_headers=True,
        asyncore_use_poll=True,  # select() cannot watch descriptors above 1023
    )
    table.start()
    drain = _Drain(server, listener, table, on_drain, drain_timeout_s)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, drain.on_signal)
    try:
        server.run()
    finally:
        table.stop()


class _Drain:
    """SIGTERM -> stop accepting -> wait for in-flight requests -> leave ``server.run``.

    The signal handler runs in the main thread (the one in waitress's loop): it
    stops the listener (``accepting`` off, so the loop stops polling it; the
    socket is shut down so the kernel's SO_REUSEPORT group sends new connections
    to the other workers) and starts a waiter thread. When no request is in
    progress the waiter signals the process again and the handler raises
    SystemExit, which ``server.run`` handles by stopping its threads."""

    def __init__(self, server: Any, listener: socket.socket, table: ConnectionTable,
                 on_drain: Callable[[], None] | None, timeout_s: float) -> None:
        self.server, self.listener, self.table = server, listener, table
        self.on_drain, self.timeout_s = on_drain, timeout_s
        self.started = False
        self.done = threading.Event()

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.done.is_set():
            raise SystemExit(0)
        if self.started:
            return
        self.started = True
        if self.on_drain is not None:
            self.on_drain()
        self.server.accepting = False  # wasyncore's public flag: the listener is not polled
        try:
            self.listener.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        threading.Thread(target=self._wait, name="drain", daemon=True).start()

    def _wait(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        quiet = 0
        while time.monotonic() < deadline and quiet < 2:
            quiet = quiet + 1 if self.table.busy() == 0 else 0
            time.sleep(0.05)
        log.info("drained (%s); stopping", "idle" if quiet >= 2 else "timeout")
        self.done.set()
        os.kill(os.getpid(), signal.SIGTERM)


def start_grpc(app: Flask, settings: ServerSettings, config: ApiConfig) -> Any:
    """The OIP gRPC server on the same app (``api.grpc_server``), or None without --grpc-port."""
    if settings.grpc_port is None:
        return None
    try:
        from .grpc_server import GrpcServer
    except ImportError:
        raise ServerConfigError("--grpc-port needs the grpc extra: pip install 'edgeward[grpc]'") from None
    from .app import ACCESS_EXT
    from .routes.v2 import STATS_EXT
    from .state import EXT

    srv = GrpcServer(app.extensions[EXT], app.extensions[STATS_EXT], app.extensions[ACCESS_EXT], settings.host,
                     settings.grpc_port, settings.threads, config.max_body_bytes).start()
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    sys.stderr.write(f"edgeward: serving OIP gRPC on {shown}:{srv.port} (pid={os.getpid()})\n")
    sys.stderr.flush()
    return srv


def _waitress(app: Flask, sock: socket.socket, settings: ServerSettings, config: ApiConfig) -> None:
    from .state import EXT

    st = app.extensions[EXT]
    grpc_server = start_grpc(app, settings, config)

    def on_drain() -> None:
        st.draining = True

    try:
        run_waitress(app, sock, settings.threads, config.max_body_bytes, settings.connection_limits(),
                     on_drain=on_drain, drain_timeout_s=settings.drain_timeout_s)
    finally:
        if grpc_server is not None:  # HTTP has drained; let in-flight RPCs finish too
            grpc_server.stop(min(settings.drain_timeout_s, 5.0))


def _announce(host: str, port: int, workers: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"edgeward: serving on http://{shown}:{port} (workers={workers}, pid={os.getpid()})\n")
    sys.stderr.flush()


def startup_error(exc: BaseException) -> str | None:
    """One-line text for a failure to start serving a bundle (None: not one of those)."""
    from runtime_guard.errors import LoadError

    if isinstance(exc, LoadError):
        return f"{exc.check}: {exc}"
    if isinstance(exc, (ValueError, OSError, LookupError)):
        return str(exc)
    return None


def worker_main(config: ApiConfig, settings: ServerSettings, port: int, ready: Any,
                errors: Any = None) -> None:
    """Body of one supervised worker process: build the app, bind, tell the parent, serve.
    A bundle that cannot be served exits 2; its one-line reason goes to ``errors`` (a
    queue the parent reports from, so N workers do not print N lines) or stderr."""
    from . import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    try:
        app = create_app(config)
    except Exception as exc:
        line = startup_error(exc)
        if line is None:
            raise
        if errors is not None:
            errors.put(line)
        else:
            sys.stderr.write(f"error: {line}\n")
            sys.stderr.flush()
        sys.exit(2)
    sock = listen_socket(settings.host, port, reuseport=True)
    ready.set()
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
    from .supervisor import Supervisor

    return Supervisor(config, settings).run()
