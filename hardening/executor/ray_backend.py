"""Ray executor: every shard a ``@ray.remote`` task, gathered with ``ray.wait`` as they finish.

``RayExecutor()`` starts a local cluster bound to 127.0.0.1 (no dashboard, no usage
stats); ``RayExecutor("ray://HOST:PORT")`` joins a running one through Ray Client.
Tasks carry plain data (JSON metadata and numpy arrays, moved by Ray's own object
transport between this driver and its workers); workers must see the same model and
data paths (a shared filesystem, or the same checkout on every node). A worker process
that dies is retried by Ray (``max_retries``); the driver keys results by shard id, so a
retried shard is counted once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from hardening.errors import EdgewardError

MAX_RETRIES = 3
JOIN_ATTEMPTS = 3
# Local clusters stay on loopback and quiet: no dashboard, no usage report, loopback IP.
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray then takes 127.0.0.1 as this node's address
    "RAY_DEDUP_LOGS": "0",
    # Ray 2.5x clusters require a token (~/.ray/auth_token); the client sends it only in token
    # mode, read when ray is imported, so this is set before the import.
    "RAY_AUTH_MODE": "token",
}


def import_ray() -> Any:
    from hardening.executor.base import ExecutorError

    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'edgeward[ray]'") from None
    return ray


def _remote_run(ray: Any) -> Any:
    @ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1)
    def run_shard(kind: str, meta: dict, keys: list, *values: Any) -> tuple[dict, dict, dict]:
        from hardening.executor.work import run_one

        # arrays travel as top-level arguments, so Ray resolves their object refs
        out_meta, out_arrays, where = run_one(kind, meta, dict(zip(keys, values)), None)
        where["node"] = ray.get_runtime_context().get_node_id()  # nodes may share a host
        return out_meta, out_arrays, where

    return run_shard


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
        ray = import_ray()
        self.ray = ray
        self.address = address
        self._owned = False
        if not ray.is_initialized():
            try:
                if address is None:
                    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                    self._owned = True
                else:
                    self._join(address)
                    self._owned = True
            except (ConnectionError, RuntimeError, ValueError) as e:
                from hardening.executor.base import ExecutorError

                raise ExecutorError(f"cannot reach the Ray cluster {address or '(local)'}: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self._run = _remote_run(ray)

    def _join(self, address: str) -> None:
        """Ray Client; its server starts a per-client process, which can time out on a busy
        machine ("Initialization failure from server"): try a few times before giving up."""
        for attempt in range(JOIN_ATTEMPTS):
            try:
                self.ray.init(address=address, log_to_driver=False)
                return
            except ConnectionError:
                if attempt + 1 == JOIN_ATTEMPTS:
                    raise
                time.sleep(2.0 * (attempt + 1))

    def warm(self) -> None:
        """Import the audit stack once in every worker process (torch, ART: seconds each), so
        timings measure the work and not the first import."""
        ray = self.ray

        @ray.remote(num_cpus=1)
        def _warm() -> int:
            import hardening.robustness.audit  # noqa: F401

            time.sleep(0.5)  # hold the CPU so each task lands in its own worker
            return os.getpid()

        ray.get([_warm.remote() for _ in range(self.workers())])

    def workers(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1))

    def run(self, shards: list) -> Iterator[tuple[Any, dict, dict, dict]]:
        ray = self.ray
        if not shards:
            return
        put: dict[int, Any] = {}  # one object per distinct array (the full sample is shared by shards)

        def ref(a: Any) -> Any:
            if id(a) not in put:
                put[id(a)] = (ray.put(a), a)
            return put[id(a)][0]

        pending = {}
        for s in shards:
            keys = sorted(s.arrays)
            pending[self._run.remote(s.kind, s.meta, keys, *[ref(s.arrays[k]) for k in keys])] = s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                s = pending.pop(r)
                try:
                    meta, arrays, where = ray.get(r)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, EdgewardError):
                        raise cause from None
                    raise
                yield s, meta, arrays, where

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
