"""Shard kinds -> the function that does the work. Workers import this module and look the
kind up by name, so a task carries only data (no code, no pickled callables)."""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from typing import Any

from hardening.errors import InputError

# kind -> "module:function"; each takes (meta: dict, arrays: dict[str, ndarray], local: dict | None)
# and returns (meta: dict, arrays: dict[str, ndarray]), plain JSON and arrays only.
KINDS = {
    "robustness-points": "hardening.robustness.shards:run_points_shard",
    "robustness-selfcheck": "hardening.robustness.shards:run_selfcheck_shard",
    "extraction-cell": "hardening.extraction_shards:run_cell_shard",
    "ood-family": "hardening.report.runners.ood:run_family_shard",
}


def work_function(kind: str) -> Callable[..., tuple[dict, dict]]:
    if kind not in KINDS:
        raise InputError(f"unknown shard kind {kind!r}")
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def run_one(kind: str, meta: dict, arrays: dict, local: dict | None = None) -> tuple[dict, dict, dict]:
    """Run one shard here; the third value is where, how long and the peak memory (for the provenance)."""
    from hardening.executor.usage import measure

    with measure() as used:
        out_meta, out_arrays = work_function(kind)(meta, arrays, local)
    where: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                             "seconds": round(used.seconds, 4), "peak_rss_mb": used.peak_rss_mb}
    return out_meta, out_arrays, where
