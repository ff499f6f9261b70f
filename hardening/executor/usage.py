"""Wall time and peak resident memory of a block of work, for the report's provenance.

Peak RSS of *this process* during the block: ``getrusage`` keeps the process's lifetime
high-water mark, so when the block raised it, the new mark is the block's exact peak;
otherwise the peak lies below an earlier stage's and is taken from samples of the
current RSS (psutil, every ``SAMPLE_S``) with the RSS at the block's start and end.
Child processes (profiling measures each variant in a fresh one) are not included.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from dataclasses import dataclass

import psutil

SAMPLE_S = 0.02
MB = 1024 * 1024
# ru_maxrss is in KiB on Linux, in bytes on macOS
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _high_water() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _MAXRSS_UNIT


@dataclass
class Usage:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


class measure:  # noqa: N801 (used as a context manager: ``with measure() as u: ...``)
    """``with measure() as u: work()`` -> ``u.seconds``, ``u.peak_rss_mb`` after the block."""

    def __init__(self) -> None:
        self.usage = Usage()
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __enter__(self) -> Usage:
        self._hw0 = _high_water()
        self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="edgeward-rss", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self.usage

    def __exit__(self, *exc: object) -> None:
        self.usage.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        hw1 = _high_water()
        peak = hw1 if hw1 > self._hw0 else max(self._peak, self._proc.memory_info().rss)
        self.usage.peak_rss_mb = round(peak / MB, 1)
