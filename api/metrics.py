"""Prometheus metrics with a per-app ``CollectorRegistry``.

A registry per app (not the global default) keeps several apps in one process
(tests, benchmarks) from sharing or clashing on metric names.

Several processes: every worker has its own registry, so a scrape of
``/metrics`` sees the worker that answered. Either scrape each worker on its
own port, or run with ``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory:
then counters and histograms are written to per-process files and
``/metrics`` aggregates them with ``MultiProcessCollector`` (gauges read from
the guard's telemetry -- drift -- stay per-process in that mode).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from runtime_guard.verdict import Verdict

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Every label value comes from one of these fixed sets; anything else is "other", so no
# request (a random method token, an odd path, a status werkzeug invents) can add series.
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
STATUSES = frozenset(str(c) for c in (200, 201, 204, 301, 302, 304, 307, 308, 400, 401, 403, 404,
                                      405, 406, 408, 409, 411, 413, 414, 415, 416, 422, 429, 431,
                                      500, 501, 502, 503, 504))
DECISION_LABELS = frozenset({"accepted", "rejected", "rate_limited", "flagged", "error", "unavailable"})
EXTRA_REASONS = frozenset({"none", "exception", "rate_limit:storage"})


def bounded(value: str, allowed: frozenset[str] | set[str]) -> str:
    return value if value in allowed else OTHER


class TelemetryCollector(Collector):
    """Exports the served model's drift PSI (per telemetry family) at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            snap = self._snapshot() or {}
        except Exception:  # a scrape must never fail because of telemetry
            snap = {}
        drift = GaugeMetricFamily("edgeward_drift_psi",
                                  "Population stability index of recent inputs vs calibration",
                                  labels=["family"])
        samples = GaugeMetricFamily("edgeward_drift_samples",
                                    "Live samples behind each drift family (PSI is published "
                                    "only from telemetry.min_samples on)", labels=["family"])
        for family, value, n in _drift_items(snap):
            samples.add_metric([family], n)
            if value is not None:
                drift.add_metric([family], value)
        yield drift
        yield samples


def _drift_items(snap: dict[str, Any]) -> list[tuple[str, float | None, int]]:
    """``snapshot()["drift"]`` is ``{family: {"psi": float | None, "alert": bool, "n": int} | None}``;
    PSI is None below the bundle's ``telemetry.min_samples``."""
    drift = snap.get("drift")
    if not isinstance(drift, dict):
        return []
    out: list[tuple[str, float | None, int]] = []
    for name, entry in drift.items():
        if not isinstance(entry, dict) or str(name) not in ("predicted_class", "ood_score"):
            continue
        psi, n = entry.get("psi"), entry.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) else 0
        ok = isinstance(psi, (int, float)) and not isinstance(psi, bool)
        out.append((str(name), float(psi) if ok and psi is not None else None, n))
    return out


class ApiMetrics:
    """All metrics of one app."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter("edgeward_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=reg)
        self.decisions = Counter("edgeward_decisions", "Guard decisions (one per request) by outcome "
                                 "and first reason", ["decision", "reason"], registry=reg)
        self.reasons = Counter("edgeward_reasons", "Every reason the guard gave, by reason",
                               ["reason"], registry=reg)
        self.latency = Histogram("edgeward_request_latency_seconds", "Request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=reg)
        self.reloads = Counter("edgeward_reloads", "Hot update attempts by outcome",
                               ["outcome"], registry=reg)
        self.model_version = Gauge("edgeward_model_version", "Version of the bundle being served",
                                   registry=reg, multiprocess_mode="max")
        self.update_checks = Counter("edgeward_update_checks", "Fleet update checks by outcome",
                                     ["outcome"], registry=reg)
        self.rollbacks = Counter("edgeward_rollbacks", "Hot updates rolled back, by trigger",
                                 ["trigger"], registry=reg)
        # Time inside the guarded predict (sanitizer, session run, policy, rate-limit storage);
        # edgeward_request_latency_seconds minus this is time queued for a server thread,
        # reading and parsing the body and writing the answer.
        self.compute = Histogram("edgeward_inference_compute_seconds",
                                 "Time inside the guarded predict, per transport",
                                 ["transport"], buckets=LATENCY_BUCKETS, registry=reg)
        if snapshot is not None:
            reg.register(TelemetryCollector(snapshot))
        # the process_* / python_* families every Prometheus client exports (per process)
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        GCCollector(registry=reg)
        # Label children cached per label tuple: ``labels()`` validates and locks on every call,
        # which is measurable per request. Label values are bounded (routes, statuses, reason codes).
        self._children: dict[tuple[int | str, ...], Any] = {}
        from runtime_guard.telemetry import REASON_CODES

        self.reasons_allowed = frozenset(REASON_CODES) | EXTRA_REASONS
        self.endpoints_allowed: frozenset[str] = frozenset({"unmatched"})

    def allow_endpoints(self, templates: Iterable[str]) -> None:
        """The app's route templates (``/v2/models/<name>``): the only endpoint labels."""
        self.endpoints_allowed = frozenset(templates) | {"unmatched"}

    def _child(self, metric: Any, *labels: str) -> Any:
        key: tuple[int | str, ...] = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        endpoint = bounded(endpoint, self.endpoints_allowed)
        self._child(self.requests, endpoint, bounded(method, METHODS), bounded(str(status), STATUSES)).inc()
        self._child(self.latency, endpoint).observe(seconds)

    def observe_compute(self, transport: str, seconds: float) -> None:
        """Time inside the guarded predict (``edgeward_inference_compute_seconds``)."""
        self._child(self.compute, transport).observe(seconds)

    def observe_verdict(self, verdict: Verdict) -> None:
        self.observe_decision(verdict.decision.value, [r.value for r in verdict.reasons])

    def observe_decision(self, decision: str, reasons: list[str] | tuple[str, ...]) -> None:
        """Count the request once (labelled with its first reason), and each reason once."""
        decision = bounded(decision, DECISION_LABELS)
        first = bounded(reasons[0], self.reasons_allowed) if reasons else "none"
        self._child(self.decisions, decision, first).inc()
        for r in reasons:
            self._child(self.reasons, bounded(r, self.reasons_allowed)).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition format the ``Accept`` header asks for: OpenMetrics for
        ``application/openmetrics-text``, else Prometheus text 0.0.4."""
        encoder, content_type = choose_encoder(accept)
        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
            ProcessCollector(registry=reg)  # this worker's process figures
            return encoder(reg), content_type
        return encoder(self.registry), content_type
