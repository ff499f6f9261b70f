"""Per-model inference statistics in the shape of Triton's statistics extension
(``GET /v2/models/<name>/stats``), for this process: counts and cumulative
nanoseconds of successful and failed requests and of the guarded compute."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # samples (batch rows) answered
    last_inference_ms: int = 0


class InferenceStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}

    def record(self, name: str, version: str, ok: bool, ns: int, samples: int) -> None:
        with self._lock:
            e = self._entries.setdefault((name, version), _Entry())
            if ok:
                e.success += 1
                e.success_ns += ns
                e.inference_count += samples
            else:
                e.fail += 1
                e.fail_ns += ns
            e.last_inference_ms = int(time.time() * 1000)

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        with self._lock:
            e = self._entries.get((name, version), _Entry())
            def d(count: int, ns: int) -> dict[str, int]:
                return {"count": count, "ns": ns}
            return {
                "name": name, "version": version, "last_inference": e.last_inference_ms,
                "inference_count": e.inference_count, "execution_count": e.success,
                "inference_stats": {
                    "success": d(e.success, e.success_ns), "fail": d(e.fail, e.fail_ns),
                    # no request queue in front of the guard: a request runs on its server thread
                    "queue": d(e.success, 0),
                    "compute_input": d(e.success, 0), "compute_infer": d(e.success, e.success_ns),
                    "compute_output": d(e.success, 0),
                    "cache_hit": d(0, 0), "cache_miss": d(0, 0),
                },
                "batch_stats": [],
            }
