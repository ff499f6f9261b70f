"""A time budget for the model runs of a candidate bundle.

A signed model can still be hostile: a ``Loop`` of 10^9 iterations, or a
graph whose runtime shapes make one kernel run for minutes. Smoke tests run
such a model before anything is served, so they must not be able to hang the
caller (and, in the API, the reload lock it holds). ``Deadline`` hands every
run its own ``onnxruntime.RunOptions``; one timer sets ``terminate`` on all
runs still going when the budget is spent. onnxruntime checks that flag
between kernels and inside control-flow subgraphs, so the run ends with an
error within one kernel's time, which ``run`` turns into ``DeadlineExceeded``.

A single kernel that never yields is beyond what ``terminate`` can stop; the
API bounds that case too by waiting for the candidate on another thread (see
``api.reload``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .errors import ModelRejected

__all__ = ["Deadline", "DeadlineExceeded"]


class DeadlineExceeded(ModelRejected):
    """A model run of a candidate bundle did not finish within its time budget."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"model run did not finish within the {seconds:g} s deadline",
                         check="deadline")


class Deadline:
    """``seconds`` of wall-clock time shared by every ``run`` made through it."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError("deadline must be positive")
        self.seconds = float(seconds)
        self.expires = time.monotonic() + self.seconds
        self._lock = threading.Lock()
        self._active: set[Any] = set()
        self.expired = False
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for ro in self._active:
                ro.terminate = True

    def cancel(self) -> None:
        """Stop the timer (the budget is no longer needed)."""
        self._timer.cancel()

    def run(self, session: Any, names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """``session.run`` that is terminated when the budget runs out."""
        import onnxruntime as ort

        ro = ort.RunOptions()
        with self._lock:
            if self.expired:
                raise DeadlineExceeded(self.seconds)
            self._active.add(ro)
        try:
            outs: list[Any] = session.run(names, feeds, ro)
            return outs
        except Exception:
            if self.expired:
                raise DeadlineExceeded(self.seconds) from None
            raise
        finally:
            with self._lock:
                self._active.discard(ro)

    def __enter__(self) -> "Deadline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
