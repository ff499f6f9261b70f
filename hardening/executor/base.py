"""Shards, their results, the two executors' common interface, and the resumable driver loop."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from hardening.errors import EdgewardError, InputError

# progress(done shards, total shards, what just finished)
ShardProgress = Callable[[int, int, str], None]


class ExecutorError(EdgewardError):
    """The executor cannot run here (Ray missing, cluster unreachable). Exit code 2."""

    exit_code = 2


@dataclass
class Shard:
    """One unit of audit work: plain JSON ``meta`` plus numpy ``arrays``. ``local`` holds
    in-process-only helpers (live objects, a progress callback); it never leaves the driver
    and never changes the result."""

    kind: str
    label: str  # for progress and provenance, e.g. "float p0:64"
    meta: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    local: dict | None = None

    @property
    def id(self) -> str:
        """Digest of everything the result depends on: a different input is a different shard."""
        h = hashlib.sha256(self.kind.encode())
        h.update(json.dumps(self.meta, sort_keys=True, default=str).encode())
        for k in sorted(self.arrays):
            a = np.ascontiguousarray(self.arrays[k])
            h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8))  # the bytes, without a copy of the array
        return f"{self.kind}-{h.hexdigest()[:20]}"


@dataclass
class ShardResult:
    shard: Shard
    meta: dict
    arrays: dict[str, np.ndarray]
    where: dict  # host, pid, seconds (of the run that produced it)
    resumed: bool = False  # read from a checkpoint instead of run

    def provenance(self) -> dict:
        w = self.where
        return {"id": self.shard.id, "kind": self.shard.kind, "label": self.shard.label, "seconds": w.get("seconds"),
                "peak_rss_mb": w.get("peak_rss_mb"), "host": w.get("host"), "node": w.get("node"), "pid": w.get("pid"),
                "resumed": self.resumed}


class Executor(Protocol):
    name: str

    def workers(self) -> int: ...

    def run(self, shards: list[Shard]) -> Iterator[tuple[Shard, dict, dict, dict]]:
        """Yield (shard, meta, arrays, where) as shards finish, in any order; each shard once."""
        ...

    def close(self) -> None: ...


class InProcessExecutor:
    """The default: shards one after another in this process (the audit as it always ran)."""

    name = "in-process"

    def workers(self) -> int:
        return 1

    def run(self, shards: list[Shard]) -> Iterator[tuple[Shard, dict, dict, dict]]:
        from hardening.executor.usage import release_memory
        from hardening.executor.work import run_one

        for s in shards:
            meta, arrays, where = run_one(s.kind, s.meta, s.arrays, s.local)
            release_memory(collect=False)  # the next shard starts from the pages this one freed
            yield s, meta, arrays, where

    def close(self) -> None:
        return None


def parse_executor(spec: str | None) -> tuple[str, str | None]:
    """``in-process`` | ``ray`` (local cluster on 127.0.0.1) | ``ray://HOST:PORT`` (join one)."""
    spec = (spec or "in-process").strip()
    if spec in ("in-process", "local", "inprocess"):
        return "in-process", None
    if spec == "ray":
        return "ray", None
    if spec.startswith("ray://"):
        rest = spec[len("ray://"):]
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"--executor {spec!r}: expected ray://HOST:PORT")
        return "ray", spec
    raise InputError(f"unknown --executor {spec!r}; use in-process, ray or ray://HOST:PORT")


def make_executor(spec: str | None = None, workers: int | None = None) -> Any:
    """An executor from its CLI spelling; ``workers`` = CPUs of a local Ray cluster."""
    kind, address = parse_executor(spec)
    if kind == "in-process":
        return InProcessExecutor()
    from hardening.executor.ray_backend import RayExecutor

    return RayExecutor(address=address, num_cpus=workers)


def run_shards(executor: Any, shards: list[Shard], store: Any = None, resume: bool = False,
               progress: ShardProgress | None = None) -> dict[str, ShardResult]:
    """Run every shard once; results keyed by shard id (so a retried shard is counted once).

    With a ``store``, each finished shard is checkpointed as soon as it arrives; with
    ``resume`` too, shards already in the store are read back instead of run.
    """
    results: dict[str, ShardResult] = {}
    todo: list[Shard] = []
    by_id: dict[str, Shard] = {}
    for s in shards:
        if s.id in by_id:
            raise InputError(f"two shards with the same input ({s.label})")
        by_id[s.id] = s
        if resume and store is not None and store.has(s.id):
            meta, arrays, where = store.load(s.id)
            results[s.id] = ShardResult(s, meta, arrays, where, resumed=True)
        else:
            todo.append(s)
    total = len(shards)
    if progress:
        progress(len(results), total, f"{len(results)} shards from checkpoints" if results else "starting")
    for s, meta, arrays, where in executor.run(todo):
        if s.id in results:  # never count a shard twice, whatever the transport did
            continue
        if store is not None:
            store.save(s.id, meta, arrays, where)
        results[s.id] = ShardResult(s, meta, arrays, where)
        if progress:
            progress(len(results), total, f"{s.label} ({where.get('seconds', 0):.1f} s on {where.get('host')}:"
                     f"{where.get('pid')})")
    missing = [s.label for s in shards if s.id not in results]
    if missing:
        raise EdgewardError(f"shards never finished: {', '.join(missing)}")
    return results
