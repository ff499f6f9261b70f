"""PRADA extraction monitor (Juuti et al., "PRADA: Protecting against DNN Model
Stealing Attacks", EuroS&P 2019), per client, with bounded memory.

Why it works: benign clients send natural samples, whose minimum L2 distance
to the client's earlier queries of the same predicted class is roughly normally
distributed. Extraction attacks (random noise, Jacobian-based augmentation
around a few seeds) produce distances that are strongly non-normal (spikes of
tiny distances plus a tail), so a Shapiro-Wilk W below ``delta`` flags them.

Algorithm 1 of the paper: for a query x predicted as class c, d = min distance
to the growing set G_c; record d in D; add x to G_c only if d > T_c, where T_c
tracks max(T_c, mean(DG_c) - std(DG_c)). We keep G_c as a ring buffer of
``per_class_history`` queries and D as a ring of ``max_distances`` values, and
evict the least recently seen client beyond ``max_clients``. Nothing here is
exported except counts, W and "queries until flagged".

Shapiro-Wilk uses Royston's approximation (AS R94, Royston 1992/1995) in
numpy because scipy is not a device dependency.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .config import ExtractionMonitorConfig

__all__ = ["shapiro_wilk", "norm_ppf", "MonitorState", "ExtractionMonitor"]


# -- Shapiro-Wilk (Royston) ----------------------------------------------------------------

_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
      -3.066479806614716e01, 2.506628277459239e00)
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
      -1.328068155288572e01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
      4.374664141464968e00, 2.938163982698783e00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)


def norm_ppf(p: np.ndarray) -> np.ndarray:
    """Standard normal quantiles for p in (0, 1) (Acklam's rational approximation,
    relative error below 1.2e-9: far finer than Shapiro-Wilk needs)."""
    p = np.asarray(p, dtype=np.float64)
    x = np.empty_like(p)
    lo, hi = p < 0.02425, p > 1 - 0.02425
    mid = ~(lo | hi)
    q = p[mid] - 0.5
    r = q * q
    num = ((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]
    den = ((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1
    x[mid] = q * num / den
    for mask, sign, pp in ((lo, 1.0, p[lo]), (hi, -1.0, 1 - p[hi])):
        q = np.sqrt(-2 * np.log(pp))
        num = ((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5]
        den = (((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1
        x[mask] = sign * num / den
    return x


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


@lru_cache(maxsize=128)
def _sw_coefficients(n: int) -> np.ndarray:
    """Royston's approximation of the Shapiro-Wilk weights a_1..a_n (antisymmetric)."""
    if n == 3:
        s = math.sqrt(0.5)
        return np.array([-s, 0.0, s])
    i = np.arange(1, n + 1, dtype=np.float64)
    m = norm_ppf((i - 0.375) / (n + 0.25))
    mm = float(m @ m)
    u = 1 / math.sqrt(n)
    c = m / math.sqrt(mm)
    an = c[-1] + 0.221157 * u - 0.147981 * u**2 - 2.071190 * u**3 + 4.434685 * u**4 - 2.706056 * u**5
    a = np.empty(n)
    if n > 5:
        an1 = c[-2] + 0.042981 * u - 0.293762 * u**2 - 1.752461 * u**3 + 5.682633 * u**4 - 3.582633 * u**5
        phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
        a[2:-2] = m[2:-2] / math.sqrt(phi)
        a[[0, 1, -2, -1]] = [-an, -an1, an1, an]
    else:
        phi = (mm - 2 * m[-1] ** 2) / (1 - 2 * an**2)
        a[1:-1] = m[1:-1] / math.sqrt(phi)
        a[[0, -1]] = [-an, an]
    a.setflags(write=False)
    return a


def shapiro_wilk(x: np.ndarray) -> tuple[float, float]:
    """Shapiro-Wilk W and its p-value for 3 <= n <= 5000 samples.

    Raises ValueError for too few/many samples or zero variance (W undefined).
    """
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = x.size
    if not 3 <= n <= 5000:
        raise ValueError(f"Shapiro-Wilk needs 3..5000 samples, got {n}")
    if not np.isfinite(x).all():
        raise ValueError("Shapiro-Wilk needs finite samples")
    ssq = float(((x - x.mean()) ** 2).sum())
    if ssq <= 1e-300 * n or x[-1] - x[0] <= 0:
        raise ValueError("Shapiro-Wilk is undefined for constant samples")
    a = _sw_coefficients(n)
    w = min(1.0, float(a @ x) ** 2 / ssq)
    return w, _sw_pvalue(w, n)


def _sw_pvalue(w: float, n: int) -> float:
    if n == 3:
        return max(0.0, min(1.0, 6 / math.pi * (math.asin(math.sqrt(w)) - math.asin(math.sqrt(0.75)))))
    if w >= 1.0:
        return 1.0
    if n <= 11:
        gamma = 0.459 * n - 2.273
        mu = 0.5440 - 0.39978 * n + 0.025054 * n**2 - 0.0006714 * n**3
        sigma = math.exp(1.3822 - 0.77857 * n + 0.062767 * n**2 - 0.0020322 * n**3)
        y = math.log(1 - w)
        if y >= gamma:
            return 1e-99  # outside the approximation's support: extreme non-normality
        z = (-math.log(gamma - y) - mu) / sigma
    else:
        ln = math.log(n)
        mu = 0.0038915 * ln**3 - 0.083751 * ln**2 - 0.31082 * ln - 1.5861
        sigma = math.exp(0.0030302 * ln**2 - 0.082676 * ln - 0.4803)
        z = (math.log(1 - w) - mu) / sigma
    return _norm_sf(z)


_SW_STEP = 10


# -- per-client state ---------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorState:
    """Aggregates for one client (no raw queries).

    ``flagged_after`` is the number of queries the client had sent when it was
    first flagged ("queries until flagged"), or None.
    """

    client_id: str
    queries: int
    distances: int
    last_w: float | None
    min_w: float | None
    flagged: bool
    flagged_after: int | None
    throttled_for: float
    rejection_rate: float | None = None  # share of queries the gate refused (None: not told)
    label_entropy: float | None = None  # bits, of the client's top-1 label histogram
    flag_reason: str | None = None  # "prada", "rejections" or "label_entropy"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _ClassSet:
    """Ring buffer of one class's growing set plus its threshold T_c. It starts at one row and
    doubles up to ``cap`` only while the monitor's byte budget allows (``grow`` says)."""

    __slots__ = ("buf", "cap", "n", "pos", "dg_sum", "dg_sq", "dg_n", "threshold")

    def __init__(self, cap: int, dim: int) -> None:
        self.buf = np.empty((1, dim), dtype=np.float32)
        self.cap = cap
        self.n = 0
        self.pos = 0
        self.dg_sum = self.dg_sq = 0.0
        self.dg_n = 0
        self.threshold = 0.0

    def add(self, x: np.ndarray, d: float | None, grow: Callable[[int], bool]) -> None:
        rows = len(self.buf)
        if self.n == rows < self.cap:
            new = min(self.cap, 2 * rows)
            if grow((new - rows) * self.buf.shape[1] * self.buf.itemsize):
                buf = np.empty((new, self.buf.shape[1]), dtype=np.float32)
                buf[:rows] = self.buf
                self.buf, self.pos = buf, rows
        self.buf[self.pos] = x
        self.pos = (self.pos + 1) % len(self.buf)
        self.n = min(self.n + 1, len(self.buf))
        if d is not None:  # running mean/std of DG_c for T_c
            self.dg_n += 1
            self.dg_sum += d
            self.dg_sq += d * d
            mean = self.dg_sum / self.dg_n
            std = math.sqrt(max(0.0, self.dg_sq / self.dg_n - mean * mean))
            self.threshold = max(self.threshold, mean - std)


class _Client:
    __slots__ = ("classes", "dist", "nd", "dpos", "queries", "last_w", "min_w", "flagged_after", "throttled_until",
                 "flagged", "label_counts", "rejected", "told_rejected", "flag_reason", "next_slot", "nbytes")

    def __init__(self, max_distances: int) -> None:
        self.classes: dict[int, _ClassSet] = {}
        self.dist = np.empty(max_distances, dtype=np.float64)
        self.nd = 0
        self.dpos = 0
        self.queries = 0
        self.last_w: float | None = None
        self.min_w: float | None = None
        self.flagged_after: int | None = None
        self.flagged = False
        self.throttled_until = 0.0
        self.label_counts: dict[int, int] = {}
        self.rejected = 0
        self.told_rejected = 0  # queries for which the caller said whether the gate refused them
        self.flag_reason: str | None = None
        self.next_slot = 0.0  # throttle_interval: earliest time of the next admitted query
        self.nbytes = 0  # stored query rows, counted against max_history_mb

    def entropy(self) -> float:
        total = sum(self.label_counts.values())
        if total == 0:
            return 0.0
        return -sum(c / total * math.log2(c / total) for c in self.label_counts.values() if c)


class ExtractionMonitor:
    """Thread-safe PRADA detector over all clients of one model.

    ``observe()`` returns True when the client is (now) flagged: its latest
    Shapiro-Wilk W on the distance set is below ``delta``.
    """

    def __init__(self, config: ExtractionMonitorConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()
        self._clock = clock
        self.evictions = 0
        self.flags_total = 0
        self._bytes = 0  # stored query rows over all clients
        self._budget = int(config.max_history_mb * (1 << 20))
        self._center = None if config.center is None else np.asarray(config.center, dtype=np.float32)
        self._scale = None if config.scale is None else np.asarray(config.scale, dtype=np.float32)

    def observe(self, client_id: str, x: np.ndarray, labels: np.ndarray, rejected: np.ndarray | None = None) -> bool:
        """Record a batch of sanitized queries ``x`` [N, ...] with the model's raw top-1 ``labels``
        (and, when given, which of them the anomaly gate refused)."""
        cfg = self.config
        flat = x.reshape(len(x), -1)
        if self._center is not None and self._scale is not None and flat.shape[1] == self._center.shape[0]:
            flat = (flat - self._center) / self._scale
        with self._lock:
            st = self._clients.get(client_id)
            if st is None:
                st = self._clients[client_id] = _Client(cfg.max_distances)
                if len(self._clients) > cfg.max_clients:
                    self._evict_oldest()
            else:
                self._clients.move_to_end(client_id)

            def grow(extra: int, st: _Client = st) -> bool:
                return self._make_room(st, extra)

            if rejected is not None:
                st.rejected += int(np.count_nonzero(rejected))
                st.told_rejected += len(rejected)
            for row, c in zip(flat, labels.tolist()):
                st.queries += 1
                st.label_counts[c] = st.label_counts.get(c, 0) + 1
                if st.queries >= cfg.min_queries and st.queries % cfg.test_every == 0:
                    self._signals(st)
                cs = st.classes.get(c)
                if cs is None:
                    cs = st.classes[c] = _ClassSet(cfg.per_class_history, flat.shape[1])
                    if not self._make_room(st, cs.buf.nbytes):  # first row: kept even over budget
                        self._account(st, cs.buf.nbytes)
                    cs.add(row, None, grow)
                    continue
                diff = cs.buf[: cs.n] - row
                d = math.sqrt(float(np.einsum("ij,ij->i", diff, diff).min()))
                st.dist[st.dpos] = d
                st.dpos = (st.dpos + 1) % len(st.dist)
                st.nd = min(st.nd + 1, len(st.dist))
                if d > cs.threshold:
                    cs.add(row, d, grow)
                if st.nd >= cfg.min_queries and st.queries % cfg.test_every == 0:
                    self._test(st)
            return st.flagged

    def _account(self, st: _Client, nbytes: int) -> None:
        st.nbytes += nbytes
        self._bytes += nbytes

    def _drop(self, client_id: str) -> None:
        st = self._clients.pop(client_id, None)
        if st is not None:
            self._bytes -= st.nbytes

    def _evict_oldest(self) -> None:
        client_id = next(iter(self._clients))
        self._drop(client_id)
        self.evictions += 1

    def _make_room(self, st: _Client, extra: int) -> bool:
        """Evict least recently seen clients (never ``st``) until ``extra`` bytes fit the
        budget; False (the set stops growing and wraps sooner) if ``st`` alone fills it."""
        while self._bytes + extra > self._budget and len(self._clients) > 1:
            self._evict_oldest()
        if self._bytes + extra > self._budget:
            return False
        self._account(st, extra)
        return True

    def _test(self, st: _Client) -> None:
        # Test on a multiple of _SW_STEP distances so the Shapiro-Wilk weights come from a
        # small cache instead of being recomputed for every new n while the ring fills.
        n = max(3, st.nd - st.nd % _SW_STEP)
        try:
            w, _ = shapiro_wilk(st.dist[:n])
        except ValueError:  # all distances equal (e.g. one image repeated): maximally non-normal
            w = 0.0
        st.last_w = w
        st.min_w = w if st.min_w is None else min(st.min_w, w)
        if w < self.config.delta:
            self._flag(st, "prada")

    def _signals(self, st: _Client) -> None:
        cfg = self.config
        if cfg.max_rejection_rate is not None and st.told_rejected and st.rejected / st.told_rejected > cfg.max_rejection_rate:
            self._flag(st, "rejections")
        if cfg.min_label_entropy is not None and st.entropy() < cfg.min_label_entropy:
            self._flag(st, "label_entropy")

    def _flag(self, st: _Client, reason: str) -> None:
        if st.flagged:  # sticky until reset / throttle expiry
            return
        st.flagged = True
        st.flag_reason = reason
        st.flagged_after = st.queries
        self.flags_total += 1
        if self.config.action == "throttle":
            now = self._clock()
            st.throttled_until = now + self.config.throttle_seconds
            st.next_slot = now + (self.config.throttle_interval or 0.0)

    def throttled_for(self, client_id: str) -> float:
        """Seconds this client must wait before its next query (0: go ahead). Expiry resets its history.

        Without ``throttle_interval`` a throttled client waits out the whole ``throttle_seconds``; with
        it, its rate budget shrinks to one query per interval, and a 0 answer books that query's slot."""
        st = self._clients.get(client_id)
        if st is None or st.throttled_until == 0.0:
            return 0.0
        now = self._clock()
        left: float = st.throttled_until - now
        if left <= 0:
            with self._lock:
                self._drop(client_id)
            return 0.0
        interval = self.config.throttle_interval
        if interval is None:
            return left
        with self._lock:
            wait: float = st.next_slot - now
            if wait > 0:
                return min(wait, left)
            st.next_slot = now + interval
            return 0.0

    def state(self, client_id: str) -> MonitorState | None:
        with self._lock:
            st = self._clients.get(client_id)
            if st is None:
                return None
            return MonitorState(
                client_id=client_id,
                queries=st.queries,
                distances=st.nd,
                last_w=st.last_w,
                min_w=st.min_w,
                flagged=st.flagged,
                flagged_after=st.flagged_after,
                throttled_for=max(0.0, st.throttled_until - self._clock()) if st.throttled_until else 0.0,
                rejection_rate=st.rejected / st.told_rejected if st.told_rejected else None,
                label_entropy=st.entropy() if st.queries else None,
                flag_reason=st.flag_reason,
            )

    def reset(self, client_id: str | None = None) -> None:
        with self._lock:
            if client_id is None:
                self._clients.clear()
                self._bytes = 0
            else:
                self._drop(client_id)

    def snapshot(self) -> dict[str, Any]:
        """Counts only: how many clients are tracked/flagged, evictions."""
        with self._lock:
            flagged = sum(1 for s in self._clients.values() if s.flagged)
            return {
                "tracked_clients": len(self._clients),
                "flagged_clients": flagged,
                "flags_total": self.flags_total,
                "evictions": self.evictions,
            }
