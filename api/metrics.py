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
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
        for family, value in _drift_items(snap):
            drift.add_metric([family], value)
        yield drift


def _drift_items(snap: dict[str, Any]) -> list[tuple[str, float]]:
    """``snapshot()["drift"]`` is ``{family: {"psi": float, "alert": bool, "n": int} | None}``."""
    drift = snap.get("drift")
    if not isinstance(drift, dict):
        return []
    out = []
    for name, entry in drift.items():
        psi = entry.get("psi") if isinstance(entry, dict) else None
        if isinstance(psi, (int, float)) and not isinstance(psi, bool):
            out.append((str(name), float(psi)))
    return out


class ApiMetrics:
    """All metrics of one app."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter("edgeward_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "method", "status"], registry=reg)
        self.decisions = Counter("edgeward_decisions", "Guard decisions by outcome and reason",
                                 ["decision", "reason"], registry=reg)
        self.latency = Histogram("edgeward_request_latency_seconds", "Request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=reg)
        self.reloads = Counter("edgeward_reloads", "Hot update attempts by outcome",
                               ["outcome"], registry=reg)
        self.model_version = Gauge("edgeward_model_version", "Version of the bundle being served",
                                   registry=reg, multiprocess_mode="max")
        if snapshot is not None:
            reg.register(TelemetryCollector(snapshot))
        # Label children cached per label tuple: ``labels()`` validates and locks on every call,
        # which is measurable per request. Label values are bounded (routes, statuses, reason codes).
        self._children: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self._child(self.requests, endpoint, method, str(status)).inc()
        self._child(self.latency, endpoint).observe(seconds)

    def observe_decision(self, decision: str, reasons: list[str] | tuple[str, ...]) -> None:
        if not reasons:
            self._child(self.decisions, decision, "none").inc()
        for r in reasons:
            self._child(self.decisions, decision, str(r)[:64]).inc()

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
