"""Per-client and global request rate limits on top of the ``limits`` library.

Like ``limits`` itself, the strategy (moving window by default: exact counts,
no burst at window edges) is separate from the storage, which is chosen by URI:
``memory://`` for one process, ``redis://host:6379`` (or any other ``limits``
storage URI) when several worker processes must share one budget.

The client limit is hit first so a client that is over its own budget does not
also use up the global budget that other clients share.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.errors import ConfigurationError, StorageError
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage, storage_from_string
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


class SweptMemoryStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """In-process storage for all three strategies, without an expiry thread.

    Written on ``limits``' documented contract for custom storages (subclass
    ``Storage`` plus the two strategy-support bases, implement their abstract
    methods), not on ``MemoryStorage``: that one starts a ``threading.Timer``
    every 10 ms while traffic flows, and ``Thread.start()`` blocks the request
    until the new thread has been scheduled (milliseconds of tail latency on a
    loaded device, benchmarks/results/guard.md). Here each key's own window is
    trimmed when it is read, and keys nobody reads any more are dropped by a
    sweep that runs inline at most once per ``SWEEP_S`` seconds, in whichever
    call comes first. One lock makes check-and-count atomic across threads.
    Not registered as a URI scheme: ``memory://`` in ``RateLimiter`` maps here.
    """

    STORAGE_SCHEME = None  # keeps limits' own "memory" scheme as it is
    SWEEP_S = 1.0

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self._lock = threading.Lock()
        self._counters: dict[str, list[float]] = {}  # key -> [count, expires_at]
        self._events: dict[str, tuple[int, deque[float]]] = {}  # key -> (window s, hit times, oldest first)
        self._next_sweep = time.monotonic() + self.SWEEP_S

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return ()  # nothing here is a backend failure to report as StorageError

    # -- Storage (fixed window; the sliding window counter builds on these) --------------

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        with self._lock:
            return self._incr(key, expiry, amount, self._tick())

    def get(self, key: str) -> int:
        with self._lock:
            return self._count(key, self._tick())

    def get_expiry(self, key: str) -> float:
        now = time.time()
        entry = self._counters.get(key)
        return entry[1] if entry is not None and entry[1] > now else now

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            n = max(len(self._counters), len(self._events))
            self._counters.clear()
            self._events.clear()
        return n

    def clear(self, key: str) -> None:
        with self._lock:
            self._counters.pop(key, None)
            self._events.pop(key, None)

    # -- MovingWindowSupport -------------------------------------------------------------

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        with self._lock:
            now = self._tick()
            hits = self._window(key, expiry, now)
            if len(hits) + amount > limit:
                return False
            hits.extend([now] * amount)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        with self._lock:
            now = self._tick()
            hits = self._window(key, expiry, now)
            return (hits[0], len(hits)) if hits else (now, 0)

    # -- SlidingWindowCounterSupport (same weighting as limits' MemoryStorage) ------------

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        with self._lock:
            now = self._tick()
            previous, previous_ttl, current, _ = self._sliding(key, expiry, now)
            if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
                return False
            self._incr(f"{key}/{int(now / expiry)}", 2 * expiry, amount, now)
            return True

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        with self._lock:
            return self._sliding(key, expiry, self._tick())

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        now = time.time()
        with self._lock:
            for k in (f"{key}/{int((now - expiry) / expiry)}", f"{key}/{int(now / expiry)}"):
                self._counters.pop(k, None)

    # -- internals (caller holds the lock) -------------------------------------------------

    def _tick(self) -> float:
        now = time.time()
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.SWEEP_S
            self._sweep(now)
        return now

    def _incr(self, key: str, expiry: float, amount: int, now: float) -> int:
        entry = self._counters.get(key)
        if entry is None or entry[1] <= now:
            entry = self._counters[key] = [0, now + expiry]
        entry[0] += amount
        return int(entry[0])

    def _count(self, key: str, now: float) -> int:
        entry = self._counters.get(key)
        if entry is None:
            return 0
        if entry[1] <= now:
            del self._counters[key]
            return 0
        return int(entry[0])

    def _window(self, key: str, expiry: int, now: float) -> deque[float]:
        """The key's hits inside the moving window (older ones dropped)."""
        held = self._events.get(key)
        if held is None:
            held = self._events[key] = (expiry, deque())
        hits, start = held[1], now - expiry
        while hits and hits[0] < start:
            hits.popleft()
        return hits

    def _sliding(self, key: str, expiry: int, now: float) -> tuple[int, float, int, float]:
        previous = self._count(f"{key}/{int((now - expiry) / expiry)}", now)
        current = self._count(f"{key}/{int(now / expiry)}", now)
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        return previous, previous_ttl, current, (1 - ((now / expiry) % 1)) * expiry + expiry

    def _sweep(self, now: float) -> None:
        for key, (expiry, hits) in list(self._events.items()):
            if not hits or hits[-1] < now - expiry:
                del self._events[key]
        for key, (_, expires_at) in list(self._counters.items()):
            if expires_at <= now:
                del self._counters[key]

    def sweep(self) -> None:
        """Drop every expired key now (the inline sweep does this once per ``SWEEP_S``)."""
        with self._lock:
            self._sweep(time.time())

    def keys_held(self) -> int:
        """Keys in memory (moving-window keys plus counters)."""
        return len(self._events) + len(self._counters)


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
