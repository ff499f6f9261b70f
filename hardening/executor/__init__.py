"""Where audit work runs: in this process (the default) or on a Ray cluster.

An audit is cut into **shards** (robustness: variant x point range; extraction:
scenario x attack x budget; OOD: family), each a plain-data task (JSON metadata plus
numpy arrays) run by a named work function. Executors only move shards and results;
the audits plan the shards and merge the results, so the in-process default and Ray
run the same functions with the same per-shard seeds and merge to the same report.
Finished shards are checkpointed (JSON + npz, never pickle) and ``resume`` skips them.
"""

from __future__ import annotations

from hardening.executor.base import (
    Executor,
    ExecutorError,
    InProcessExecutor,
    Shard,
    ShardResult,
    make_executor,
    parse_executor,
    run_shards,
)
from hardening.executor.checkpoint import ShardStore

__all__ = [
    "Executor",
    "ExecutorError",
    "InProcessExecutor",
    "Shard",
    "ShardResult",
    "ShardStore",
    "make_executor",
    "parse_executor",
    "run_shards",
]
