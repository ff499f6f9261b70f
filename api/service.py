"""Glue between HTTP and ``runtime_guard``: load a deployment, smoke-test it,
turn a ``PredictionResult`` into an answer or a problem.

Kept apart from the routes so v1 and the KServe v2 paths share one mapping, the
``api.decisions`` table; 429s carry ``Retry-After`` and ``RateLimit-*`` /
``X-RateLimit-*`` headers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime_guard.verdict import Decision, Verdict

from .config import ApiConfig
from .decisions import refusal_problem
from .reload import Deployment, Loader


def make_loader(cfg: ApiConfig) -> Loader:
    """Loader for ModelHolder: path -> verified, admitted Deployment (not yet committed)."""
    from runtime_guard.bundle import RollbackState, load_public_key
    from runtime_guard.bundle.manifest import canonical_json

    public_key = (load_public_key(cfg.public_key) if isinstance(cfg.public_key, str)
                  else cfg.public_key)
    kek = cfg.load_kek()
    state = RollbackState(cfg.rollback_state) if cfg.rollback_state else None

    def load(source: str, deadline: Any = None) -> Deployment:
        from runtime_guard.guard import GuardedModel

        model = GuardedModel.load(source, public_key, kek, rollback_state=state,
                                  storage_uri=cfg.storage_uri, threads=cfg.intra_op_threads,
                                  accept=False, deadline=deadline)
        manifest = model.manifest
        assert manifest is not None  # GuardedModel.load sets it
        # The reader refuses non-canonical manifests, so this is the signed digest.
        digest = hashlib.sha256(canonical_json(manifest)).hexdigest()
        version = int(manifest["version"])
        name = str((manifest.get("model") or {}).get("name") or "model")

        def commit() -> None:
            if state is not None:
                state.accept(version, digest)

        return Deployment(model=model, version=version, name=name, manifest_sha256=digest,
                          source=str(source), manifest=manifest, commit=commit)

    return load


def smoke_test(dep: Deployment, deadline: Any = None) -> None:
    """The guard's own sanity run, then the bundle's signed golden set
    (``runtime_guard.golden``). Runs the session directly: no rate limit or telemetry.
    With a ``runtime_guard.deadline.Deadline`` every run is terminated when it expires."""
    model = dep.model
    model.smoke_test(deadline)
    golden = model.golden
    if golden is None:
        return
    arr = model.sanitizer(golden.inputs)
    feeds = {model.input_name: arr}
    logits = (deadline.run(model.session, [model.logits_name], feeds) if deadline is not None
              else model.session.run([model.logits_name], feeds))[0]
    golden.check(logits)


def describe(dep: Deployment) -> dict[str, Any]:
    """Public model metadata: schema and policies, never weights or keys."""
    m, cfg = dep.model, dep.model.config
    inp = cfg.input
    return {
        "name": dep.name,
        "version": dep.version,
        "manifest_sha256": dep.manifest_sha256,
        "created_at": dep.manifest.get("created_at"),
        "expires_at": dep.manifest.get("expires_at"),
        "input": {
            "name": m.input_name,
            "sample_shape": list(m.sanitizer.sample_shape),
            "dtype": inp.dtype,
            "max_batch": inp.max_batch,
            "value_range": None if inp.value_range is None else list(inp.value_range),
            "out_of_range": inp.out_of_range,
            "max_bytes": inp.max_bytes,
        },
        "output": {"num_classes": int(m.num_classes), "policy": cfg.output.policy},
        "anomaly_gate": cfg.anomaly.action,
        "rate_limit": {"per_client": cfg.rate_limit.per_client,
                       "global": cfg.rate_limit.global_limit},
    }


@dataclass
class Answer:
    """A successful guarded prediction, ready to serialise."""

    verdict: Verdict
    labels: list[int]
    scores: list[list[float]] | None
    headers: list[tuple[str, str]]

    @property
    def decision(self) -> str:
        return self.verdict.decision.value

    @property
    def reasons(self) -> list[str]:
        return [r.value for r in self.verdict.reasons]


def rate_headers(status: Any, legacy: bool = False) -> list[tuple[str, str]]:
    """``RateLimit-*`` (IETF draft); with ``legacy`` also ``X-RateLimit-*`` (sent on 429s)."""
    if status is None:
        return []
    vals = (("Limit", str(status.limit)), ("Remaining", str(status.remaining)),
            ("Reset", str(max(0, math.ceil(status.reset_after)))))
    out = [(f"RateLimit-{k}", v) for k, v in vals]
    if legacy:
        out += [(f"X-RateLimit-{k}", v) for k, v in vals]
    return out


def run_predict(dep: Deployment, x: np.ndarray, client_id: str, status_headers: bool = False) -> Answer:
    """Guarded predict; a refusal becomes the ``api.decisions`` problem (carrying the
    verdict). With ``status_headers`` accepted answers carry ``RateLimit-*`` too (429s always do)."""
    res = dep.model.predict(x, client_id)
    verdict = res.verdict
    if verdict.decision is Decision.RATE_LIMITED:
        wait = max(1, math.ceil(res.retry_after or 1))
        retry_headers = dict(rate_headers(res.rate_limit, legacy=True))
        retry_headers["Retry-After"] = str(wait)
        raise refusal_problem(verdict, wait=wait, headers=retry_headers)
    if not verdict.answered:
        raise refusal_problem(verdict)
    assert res.labels is not None  # answered
    headers = (rate_headers(dep.model.rate_limit_status(client_id))
               if status_headers and dep.model.limiter.enabled else [])
    return Answer(verdict, res.labels.tolist(),
                  None if res.scores is None else res.scores.tolist(), headers)
