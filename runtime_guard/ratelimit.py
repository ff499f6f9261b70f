"""Per-client and global request rate limits on top of the ``limits`` library.

Like ``limits`` itself, the strategy (moving window by default: exact counts,
no burst at window edges) is separate from the storage, which is chosen by URI:
``memory://`` for one process, ``redis://host:6379`` (or any other ``limits``
storage URI) when several worker processes must share one budget.

The client limit is hit first so a client that is over its own budget does not
also use up the global budget that other clients share.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.errors import ConfigurationError, StorageError
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.strategies import (
    RateLimiter as _LimitsStrategy,
)

from .config import RateLimitConfig
from .errors import RequestError

__all__ = ["RateLimitStatus", "RateLimiter", "STRATEGIES", "StorageHealth", "StorageUnavailable",
           "SweptMemoryStorage"]
log = logging.getLogger("runtime_guard.ratelimit")

STRATEGIES: dict[str, type[_LimitsStrategy]] = {
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
}
_NS = "edgeward"


class _NeverIdle:
    """Stands in for MemoryStorage's expiry ``Timer``: reports alive so none is started."""

    @staticmethod
    def is_alive() -> bool:
        return True

    @staticmethod
    def cancel() -> None:
        return None


class SweptMemoryStorage(MemoryStorage):
    """``limits``' in-process storage without its expiry thread.

    ``MemoryStorage`` starts a ``threading.Timer`` every 10 ms while traffic
    flows; ``Thread.start()`` blocks the request until the new thread has been
    scheduled (milliseconds on a loaded device), and each expiry pass copies
    every key's entry list while holding the GIL. Expiry only reclaims memory
    (every read checks timestamps itself), so here it runs inline, at most
    once per ``SWEEP_S`` seconds, in whichever request comes first, trimming
    expired entries in place. Counting semantics are the library's own.
    Not registered as a URI scheme: ``memory://`` in ``RateLimiter`` maps here.
    """

    # Storage declares list[str] | None; None keeps this subclass out of the URI registry,
    # MemoryStorage's narrower inferred list[str] is what mypy compares against.
    STORAGE_SCHEME = None  # type: ignore[assignment]
    SWEEP_S = 1.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: str) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.timer.cancel()  # the one the base class started; no more are started
        self.timer = _NeverIdle()  # type: ignore[assignment]
        self._sweep_lock = threading.Lock()
        self._next_sweep = time.monotonic() + self.SWEEP_S

    def _MemoryStorage__schedule_expiry(self) -> None:  # overrides the base's private hook
        now = time.monotonic()
        if now < self._next_sweep or not self._sweep_lock.acquire(False):
            return
        try:
            self._next_sweep = now + self.SWEEP_S
            self.sweep()
        finally:
            self._sweep_lock.release()

    def sweep(self) -> None:
        """Drop expired moving-window entries and expired counters (memory only)."""
        now = time.time()
        for key in list(self.events):
            with self.locks[key]:
                events = self.events.get(key)
                if events and events[-1].expiry <= now:  # newest first: expired ones are the tail
                    del events[bisect.bisect_left(events, -now, key=lambda e: -e.expiry):]
                if not events:
                    self.events.pop(key, None)
                    self.locks.pop(key, None)
        for key in list(self.expirations):
            if self.expirations.get(key, now + 1) <= now:
                self.storage.pop(key, None)
                self.expirations.pop(key, None)
                self.locks.pop(key, None)


# ``Storage.__init_subclass__`` wraps these methods in an error-translating layer
# for every subclass, so subclassing MemoryStorage would wrap them twice (two extra
# Python frames per storage call, several calls per request). Keep the library's
# single layer.
for _name in ("incr", "get", "get_expiry", "check", "reset", "clear"):
    setattr(SweptMemoryStorage, _name, getattr(MemoryStorage, _name))


def _storage(uri: str) -> Storage:
    if uri.split("://", 1)[0] == "memory":
        return SweptMemoryStorage(uri)
    # wrap_exceptions: every backend failure arrives as limits' StorageError (public API),
    # whatever client library the backend uses, so one except clause covers them all.
    options: dict[str, float | str | bool] = {}
    scheme = uri.split("://", 1)[0]
    if scheme in _REDIS_SCHEMES and "timeout" not in uri.split("?", 1)[-1]:
        # redis-py waits forever by default: a black-holed Redis would hang every request
        # (and readiness) instead of failing closed with a 503.
        options = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S}
    storage = storage_from_string(uri, wrap_exceptions=True, **options)
    if not isinstance(storage, Storage):  # an async+ scheme: its calls would return coroutines
        raise ConfigurationError(f"rate-limit storage {uri!r} is asynchronous; use a synchronous scheme")
    return storage


_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+unix"})
REDIS_TIMEOUT_S = 1.0


class StorageUnavailable(RequestError, RuntimeError):
    """The shared rate-limit storage could not be reached: the request is refused
    (fail closed), not answered unlimited. ``cause`` names the backend error class
    (never its message: it may carry a URI with credentials)."""

    def __init__(self, cause: str, retry_after: float) -> None:
        super().__init__(f"rate-limit storage unavailable ({cause})", check="rate-limit-storage")
        self.cause = cause
        self.retry_after = retry_after


class StorageHealth:
    """Up/down state of the storage, so an outage is logged once when it starts and
    once when it ends (not per request), and readiness can report it."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.failures = 0
        self.cause = ""

    @property
    def ok(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> StorageUnavailable:
        inner = getattr(exc, "storage_error", None) or exc.__cause__ or exc
        cause = type(inner).__name__
        with self._lock:
            self.failures += 1
            first = self.down_since is None
            if first:
                self.down_since = time.monotonic()
                self.cause = cause
        if first:
            log.warning("rate-limit storage unavailable (%s): refusing requests with 503 until it "
                        "answers again", cause)
        return StorageUnavailable(cause, 1.0)

    def succeeded(self) -> None:
        if self.down_since is None:  # hot path: one attribute read
            return
        with self._lock:
            since, n = self.down_since, self.failures
            self.down_since, self.failures = None, 0
        if since is not None:
            log.warning("rate-limit storage reachable again after %.1f s (%d requests refused)",
                        time.monotonic() - since, n)

    def probe(self) -> bool:
        """During an outage, ask the storage directly (readiness checks use this:
        a server that gets no traffic while unready must still notice recovery)."""
        if self.down_since is None:
            return True
        try:
            alive = bool(self._storage.check())
        except Exception:  # check() should not raise; a broken backend may
            alive = False
        if alive:
            self.succeeded()
        return alive


@dataclass(frozen=True)
class RateLimitStatus:
    """What an API needs for ``RateLimit-*`` / ``Retry-After`` headers.

    ``scope`` is "client" or "global" (the binding limit); ``reset_after`` is
    seconds until at least one more request is allowed in that scope.
    """

    allowed: bool
    scope: str
    limit: int
    remaining: int
    reset_after: float


class RateLimiter:
    """``hit(client_id)`` returns None when allowed (fast path) or the status that refused it."""

    def __init__(self, config: RateLimitConfig, storage_uri: str = "memory://") -> None:
        self.config = config
        self.storage = _storage(storage_uri)
        self.strategy = STRATEGIES[config.strategy](self.storage)
        self._client: RateLimitItem | None = parse(config.per_client) if config.per_client else None
        self._global: RateLimitItem | None = parse(config.global_limit) if config.global_limit else None
        self.health = StorageHealth(self.storage)

    @property
    def enabled(self) -> bool:
        return self._client is not None or self._global is not None

    def hit(self, client_id: str) -> RateLimitStatus | None:
        """Consume one request from the client and global budgets.

        Raises ``StorageUnavailable`` when the storage cannot be reached."""
        hit = self.strategy.hit
        try:
            if self._client is not None and not hit(self._client, _NS, "client", client_id):
                return self._stats(self._client, "client", client_id)
            if self._global is not None and not hit(self._global, _NS, "global"):
                return self._stats(self._global, "global")
        except StorageError as exc:
            raise self.health.failed(exc) from None
        self.health.succeeded()
        return None

    def status(self, client_id: str) -> RateLimitStatus | None:
        """The most constraining scope right now, without consuming (for response headers)."""
        found = []
        try:
            if self._client is not None:
                found.append(self._stats(self._client, "client", client_id))
            if self._global is not None:
                found.append(self._stats(self._global, "global"))
        except StorageError as exc:
            raise self.health.failed(exc) from None
        return min(found, key=lambda s: (s.remaining, -s.reset_after)) if found else None

    def _stats(self, item: RateLimitItem, scope: str, *ident: str) -> RateLimitStatus:
        stats = self.strategy.get_window_stats(item, _NS, scope, *ident)
        return RateLimitStatus(
            allowed=stats.remaining > 0,
            scope=scope,
            limit=item.amount,
            remaining=max(0, int(stats.remaining)),
            reset_after=max(0.0, stats.reset_time - time.time()),
        )
