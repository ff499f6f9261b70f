"""Shard kinds -> the function that does the work. Workers import this module and look the
kind up by name, so a task carries only data (no code, no pickled callables)."""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from hardening.errors import InputError

# kind -> "module:function"; each takes (meta: dict, arrays: dict[str, ndarray], local: dict | None)
# and returns (meta: dict, arrays: dict[str, ndarray]), plain JSON and arrays only.
KINDS = {
    "robustness-points": "hardening.robustness.shards:run_points_shard",
    "robustness-selfcheck": "hardening.robustness.shards:run_selfcheck_shard",
    "extraction-cell": "hardening.extraction_shards:run_cell_shard",
}


def work_function(kind: str) -> Callable[..., tuple[dict, dict]]:
    if kind not in KINDS:
        raise InputError(f"unknown shard kind {kind!r}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def run_one(kind: str, meta: dict, arrays: dict, local: dict | None = None) -> tuple[dict, dict, dict]:
    """Run one shard here; the third value is where and how long (for the provenance)."""
    t0 = time.perf_counter()
    out_meta, out_arrays = work_function(kind)(meta, arrays, local)
    where: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                             "seconds": round(time.perf_counter() - t0, 4)}
    return out_meta, out_arrays, where
