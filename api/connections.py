"""Bounded connections for waitress: a header-read deadline and per-peer caps.

waitress has one shared ``connection_limit`` and a ``channel_timeout`` that
restarts on every byte, so ~1,000 clients each trickling a header line every
few seconds hold every slot and lock everyone else out. This module bounds
that with two things waitress accepts through its public ``sockets=`` option
(a listening socket of our own class; no waitress internals):

* ``BoundedListener.accept`` admits a connection only if its peer address has
  fewer than ``per_peer`` open connections, the total is under ``max_total``,
  and -- for a peer that already holds connections -- the total is under
  ``max_total - reserve``; the reserve is for peers that hold none. Refused
  connections get a one-shot ``503`` and are closed at once.
* ``GuardedConnection`` (the accepted sockets) notes when a request's header
  block starts (first byte after the previous response, or the connect) and
  ends (``\\r\\n\\r\\n``); a reaper thread shuts down any connection whose
  headers take longer than ``header_timeout_s`` in total, however slowly
  the bytes trickle in. Bodies and idle keep-alive stay under waitress's own
  ``channel_timeout``.

The table also tells a draining server when no request is in progress.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["ConnectionLimits", "ConnectionTable", "BoundedListener", "GuardedConnection"]

_HEADERS, _ACTIVE, _IDLE = 0, 1, 2
_END = b"\r\n\r\n"


def _refusal() -> bytes:
    body = (b'{"type": "https://edgeward.dev/problems/too-many-connections", '
            b'"title": "Service Unavailable", "status": 503, "check": "connections"}')
    return (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
            b"Content-Type: application/problem+json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


REFUSAL = _refusal()


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-process connection policy (see the module docstring)."""

    header_timeout_s: float = 10.0
    max_total: int = 1000
    per_peer: int = 64
    reserve: int = 50

    def __post_init__(self) -> None:
        if not 0.1 <= self.header_timeout_s <= 3600:
            raise ValueError("header timeout must be between 0.1 and 3600 seconds")
        if not 1 <= self.max_total <= 100_000:
            raise ValueError("max connections must be between 1 and 100000")
        if not 1 <= self.per_peer <= self.max_total:
            raise ValueError("max connections per peer must be between 1 and max connections")
        if not 0 <= self.reserve < self.max_total:
            raise ValueError("connection reserve must be below max connections")


class ConnectionTable:
    """Open connections by peer, their header state, and the reaper thread."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.by_peer: dict[str, int] = {}
        self.conns: set[GuardedConnection] = set()
        self.refused = 0
        self.reaped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def total(self) -> int:
        return len(self.conns)

    def admit(self, peer: str) -> bool:
        lim = self.limits
        with self.lock:
            mine = self.by_peer.get(peer, 0)
            total = len(self.conns)
            ok = (mine < lim.per_peer and total < lim.max_total
                  and (mine == 0 or total < lim.max_total - lim.reserve))
            if not ok:
                self.refused += 1
            return ok

    def add(self, conn: "GuardedConnection") -> None:
        with self.lock:
            self.conns.add(conn)
            self.by_peer[conn.peer] = self.by_peer.get(conn.peer, 0) + 1

    def _release_locked(self, conn: "GuardedConnection") -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            left = self.by_peer.get(conn.peer, 1) - 1
            if left > 0:
                self.by_peer[conn.peer] = left
            else:
                self.by_peer.pop(conn.peer, None)

    def busy(self) -> int:
        """Connections with a request in progress (headers complete, answer not yet sent)."""
        with self.lock:
            return sum(1 for c in self.conns if c.state == _ACTIVE)

    def reap(self, now: float | None = None) -> int:
        """Shut down connections whose header block is past the deadline. The shutdown
        happens under the lock that ``close`` takes, so a descriptor is never reused
        between the check and the shutdown."""
        now = time.monotonic() if now is None else now
        limit = self.limits.header_timeout_s
        n = 0
        with self.lock:
            for c in list(self.conns):
                if c.state == _HEADERS and now - c.started > limit and not c.reaped:
                    c.reaped = True
                    try:
                        c.shutdown(socket.SHUT_RDWR)  # waitress sees EOF and closes the channel
                    except OSError:
                        pass
                    n += 1
            self.reaped += n
        return n

    def start(self) -> None:
        if self._thread is not None:
            return
        period = max(0.05, min(0.5, self.limits.header_timeout_s / 4))

        def loop() -> None:
            while not self._stop.wait(period):
                self.reap()

        self._thread = threading.Thread(target=loop, name="header-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


class GuardedConnection(socket.socket):
    """An accepted socket that reports its request-header progress to the table."""

    def __init__(self, family: int, type_: int, proto: int, fileno: int,
                 table: ConnectionTable, peer: str) -> None:
        super().__init__(family, type_, proto, fileno=fileno)
        self.table = table
        self.peer = peer
        self.state = _HEADERS
        self.started = time.monotonic()
        self.reaped = False
        self._tail = b""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if data:
            if self.state == _IDLE:
                self.state, self.started, self._tail = _HEADERS, time.monotonic(), b""
            if self.state == _HEADERS:
                buf = self._tail + data
                if _END in buf:
                    self.state, self._tail = _ACTIVE, b""
                else:
                    self._tail = buf[-3:]
        return data

    def send(self, data: ReadableBuffer, flags: int = 0) -> int:
        n = super().send(data, flags)
        if self.state == _ACTIVE:
            self.state = _IDLE  # answering: the next byte from the client starts new headers
        return n

    def close(self) -> None:
        with self.table.lock:
            self.table._release_locked(self)
            super().close()


class BoundedListener(socket.socket):
    """A listening socket whose ``accept`` applies ``ConnectionLimits``."""

    table: ConnectionTable

    @classmethod
    def wrap(cls, sock: socket.socket, table: ConnectionTable) -> "BoundedListener":
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.table = table
        return listener

    def accept(self) -> tuple[socket.socket, object]:
        while True:
            plain, addr = super().accept()  # BlockingIOError when the queue is empty
            peer = str(addr[0]) if isinstance(addr, tuple) else str(addr)
            if not self.table.admit(peer):
                try:
                    plain.setblocking(False)
                    plain.send(REFUSAL)
                except OSError:
                    pass
                plain.close()
                continue
            conn = GuardedConnection(plain.family, plain.type, plain.proto, plain.detach(),
                                     self.table, peer)
            self.table.add(conn)
            return conn, addr
