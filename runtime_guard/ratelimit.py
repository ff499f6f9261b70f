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
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter as _LimitsStrategy,
    SlidingWindowCounterRateLimiter,
)

from .config import RateLimitConfig

__all__ = ["RateLimitStatus", "RateLimiter", "STRATEGIES", "SweptMemoryStorage"]

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

    STORAGE_SCHEME = None
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
    return storage_from_string(uri)


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

    @property
    def enabled(self) -> bool:
        return self._client is not None or self._global is not None

    def hit(self, client_id: str) -> RateLimitStatus | None:
        """Consume one request from the client and global budgets."""
        hit = self.strategy.hit
        if self._client is not None and not hit(self._client, _NS, "client", client_id):
            return self._stats(self._client, "client", client_id)
        if self._global is not None and not hit(self._global, _NS, "global"):
            return self._stats(self._global, "global")
        return None

    def status(self, client_id: str) -> RateLimitStatus | None:
        """The most constraining scope right now, without consuming (for response headers)."""
        found = []
        if self._client is not None:
            found.append(self._stats(self._client, "client", client_id))
        if self._global is not None:
            found.append(self._stats(self._global, "global"))
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
