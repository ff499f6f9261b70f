"""Wall time and peak resident memory of a block of work, for the report's provenance.

Peak RSS of *this process* during the block: ``getrusage`` keeps the process's lifetime
high-water mark, so when the block raised it, the new mark is the block's exact peak;
otherwise the peak lies below an earlier stage's and is taken from samples of the
current RSS (psutil, every ``SAMPLE_S``) with the RSS at the block's start and end.

Child processes (profiling measures each variant in a fresh one) count too: the largest
child's peak (samples of the live children every ``CHILD_SAMPLE_S``, raised to the exact
peak a child reports itself, e.g. its VmHWM, where the caller has it) and the largest
sampled sum of this process and its children, so a stage's figures cover the whole
process tree that did its work. (``RUSAGE_CHILDREN`` cannot say it: a child's ru_maxrss
starts from the parent's RSS at fork, so a trivial child of a 1 GB parent reads 1 GB.)
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import psutil

SAMPLE_S = 0.02
CHILD_SAMPLE_S = 0.25  # listing children scans /proc: sampled less often than this process
MB = 1024 * 1024
# ru_maxrss is in KiB on Linux, in bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _high_water() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _MAXRSS_UNIT


@lru_cache(maxsize=1)
def _malloc_trim():  # type: ignore[no-untyped-def]
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_FREEZING = [0]


@contextmanager
def frozen_survivors() -> Iterator[None]:
    """Within a long run of stages, objects that survive a ``release_memory`` collection
    (imported libraries, the data set, results so far) are moved out of the collector's
    reach (``gc.freeze``), so each later collection only traverses what is new: with torch,
    ART and scikit-learn loaded a full collection otherwise costs 0.3-1.5 s. Survivors that
    become cyclic garbage later wait for the end, where everything is unfrozen and collected."""
    _FREEZING[0] += 1
    try:
        yield
    finally:
        _FREEZING[0] -= 1
        if not _FREEZING[0]:
            gc.unfreeze()
            gc.collect()


def release_memory(collect: bool = True) -> None:
    """Free what a finished piece of work left behind: collect reference cycles (torch
    modules, ART estimators and onnxruntime wrappers keep some) and hand freed heap pages
    back to the OS (glibc's ``malloc_trim``), which otherwise keeps them, so the process
    would stay at the high-water mark of every earlier stage and the next one would add on
    top (measured on a MobileNetV3 audit: 1.70 GB resident after robustness, 0.71 GB after this).
    ``collect=False`` only trims: a full collection takes 0.3-1.5 s once torch and ART are
    loaded, so it ends stages and variants, not every shard."""
    if collect:
        gc.collect()
        if _FREEZING[0]:
            gc.freeze()  # what survived stays out of later collections (see ``frozen_survivors``)
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # largest single process: this one or a child
    self_peak_rss_mb: float = 0.0  # this process alone
    children_peak_rss_mb: float | None = None  # largest child process; None when none ran
    tree_peak_rss_mb: float = 0.0  # this process plus its live children, at the sampled peak

    def record(self) -> dict:
        """The fields of a ``provenance.stages`` record."""
        return {"seconds": round(self.seconds, 3), "peak_rss_mb": self.peak_rss_mb,
                "self_peak_rss_mb": self.self_peak_rss_mb, "children_peak_rss_mb": self.children_peak_rss_mb,
                "tree_peak_rss_mb": self.tree_peak_rss_mb}


class measure:  # noqa: N801 (used as a context manager: ``with measure() as u: ...``)
    """``with measure() as u: work()`` -> ``u.seconds``, ``u.peak_rss_mb`` (and the
    children's figures) after the block; ``split()`` ends one period and starts the next."""

    def __init__(self) -> None:
        self.usage = Usage()
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _reset(self) -> None:
        self._hw0 = _high_water()
        self._peak = self._proc.memory_info().rss
        self._child_peak = 0
        self._tree_peak = self._peak
        self._t0 = time.perf_counter()

    def _children_rss(self) -> list[int]:
        out = []
        for c in self._proc.children(recursive=True):
            try:
                out.append(c.memory_info().rss)
            except psutil.Error:  # finished between listing and reading
                pass
        return out

    def _sample(self) -> None:
        next_children = 0.0
        while not self._stop.wait(SAMPLE_S):
            rss = self._proc.memory_info().rss
            now = time.perf_counter()
            kids = None
            if now >= next_children:
                kids = self._children_rss()
                next_children = now + CHILD_SAMPLE_S
            with self._lock:
                self._peak = max(self._peak, rss)
                if kids is not None:
                    self._child_peak = max([self._child_peak, *kids])
                    self._tree_peak = max(self._tree_peak, rss + sum(kids))

    def __enter__(self) -> Usage:
        self._reset()
        self._thread = threading.Thread(target=self._sample, name="edgeward-rss", daemon=True)
        self._thread.start()
        return self.usage

    def _read(self) -> Usage:
        """The period since the last reset, as a ``Usage``."""
        with self._lock:
            rss = self._proc.memory_info().rss
            hw1 = _high_water()
            own = hw1 if hw1 > self._hw0 else max(self._peak, rss)
            child = self._child_peak
            tree = max(self._tree_peak, own, child)
            u = Usage(seconds=time.perf_counter() - self._t0, peak_rss_mb=round(max(own, child) / MB, 1),
                      self_peak_rss_mb=round(own / MB, 1), children_peak_rss_mb=round(child / MB, 1) if child else None,
                      tree_peak_rss_mb=round(tree / MB, 1))
        return u

    def split(self) -> Usage:
        """End the current period (its figures) and start a new one, the sampler still running."""
        u = self._read()
        with self._lock:
            self._reset()
        return u

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        u = self._read()
        for k, v in vars(u).items():
            setattr(self.usage, k, v)
