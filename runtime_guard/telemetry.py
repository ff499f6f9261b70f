"""Privacy-preserving runtime telemetry: counters and histograms only.

Raw inputs, outputs and client ids never enter telemetry; what leaves the
device is aggregate counts (requests, decisions, reasons, latency, OOD-score and
predicted-class histograms) and drift scores (PSI against the reference
histograms signed into the bundle). With ``epsilon`` set, every exported count
gets independent Laplace(1/epsilon) noise: each aggregate family is then
epsilon-DP per snapshot with respect to one sample (one row of one request);
a whole snapshot costs k*epsilon for its k families, and repeated snapshots
compose. Drift is computed from the (noised) counts, so it is post-processing.

Independent of prometheus: the API layer exports ``snapshot()``.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Iterable

import numpy as np

from .config import TelemetryConfig
from .errors import PartsMismatch
from .verdict import Decision, Reason, Verdict

__all__ = ["Telemetry", "psi", "DECISIONS", "REASON_CODES"]

DECISIONS = tuple(d.value for d in Decision)
# Every reason GuardedModel can give; exported with zeros so the key set leaks nothing.
REASON_CODES = tuple(r.value for r in Reason)

# Families that get noise (and count toward the privacy cost) in a snapshot.
_FAMILIES = ("requests", "decisions", "reasons", "latency", "classes", "ood")


def psi(live: Iterable[float], reference: Iterable[float], floor: float = 1e-4) -> float:
    """Population stability index between two histograms over the same bins.

    Proportions are floored at ``floor`` so empty bins do not make it infinite.
    Common reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift.
    """
    a = np.asarray(list(live), dtype=np.float64)
    b = np.asarray(list(reference), dtype=np.float64)
    if a.shape != b.shape or a.sum() <= 0 or b.sum() <= 0:
        raise ValueError("psi needs two non-empty histograms with the same bins")
    p = np.maximum(a / a.sum(), floor)
    q = np.maximum(b / b.sum(), floor)
    return float(((p - q) * np.log(p / q)).sum())


class Telemetry:
    """Thread-safe aggregate recorder; ``record()`` is on the hot path and cheap."""

    def __init__(self, config: TelemetryConfig, num_classes: int) -> None:
        self.config = config
        self.num_classes = num_classes
        if config.reference_class_counts is not None and len(config.reference_class_counts) != num_classes:
            raise PartsMismatch(
                f"telemetry.reference_class_counts has {len(config.reference_class_counts)} entries, "
                f"model has {num_classes} classes"
            )
        self._lat_edges = [e / 1e3 for e in config.latency_buckets_ms]  # seconds
        self._ood_edges = list(config.ood_edges) if config.ood_edges is not None else None
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            # keyed by the enum members (no ``.value`` lookups per request); wire strings in snapshot()
            self._decisions: dict[Decision, int] = dict.fromkeys(Decision, 0)
            self._reasons: dict[Reason, int] = dict.fromkeys(Reason, 0)
            self.latency = [0] * (len(self._lat_edges) + 1)  # last bucket: above the top edge
            self.latency_sum = 0.0
            self.classes = [0] * self.num_classes
            self.ood = [0] * (len(self._ood_edges) + 1) if self._ood_edges is not None else None

    def record(
        self,
        verdict: Verdict,
        latency_s: float,
        labels: np.ndarray | None = None,
        ood_scores: np.ndarray | None = None,
    ) -> None:
        lab = labels.tolist() if labels is not None else ()
        oods = ood_scores.tolist() if ood_scores is not None and self.ood is not None else ()
        with self._lock:
            self.requests += 1
            self._decisions[verdict.decision] += 1
            for r in verdict.reasons:
                self._reasons[r] += 1
            self.latency[bisect.bisect_left(self._lat_edges, latency_s)] += 1
            self.latency_sum += latency_s
            for c in lab:
                self.classes[c] += 1
            if self.ood is not None and self._ood_edges is not None:  # oods is empty otherwise
                for s in oods:
                    self.ood[bisect.bisect_right(self._ood_edges, s)] += 1

    def snapshot(self, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Plain-dict aggregates (+ drift). Noised if ``config.epsilon`` is set."""
        with self._lock:
            raw: dict[str, Any] = {
                "requests": self.requests,
                "decisions": {d.value: n for d, n in self._decisions.items()},
                "reasons": {r.value: n for r, n in self._reasons.items()},
                "latency": list(self.latency),
                "classes": list(self.classes),
                "ood": list(self.ood) if self.ood is not None else None,
            }
            latency_sum = self.latency_sum
        eps = self.config.epsilon
        if eps is not None:
            rng = rng or np.random.default_rng()
            raw = {k: _noised(v, eps, rng) for k, v in raw.items()}
        out = {
            "requests_total": raw["requests"],
            "decisions": raw["decisions"],
            "reasons": raw["reasons"],
            "latency_seconds": {
                "buckets_le": self._lat_edges + [math.inf],
                "counts": raw["latency"],
                # a sum is unbounded per request, so it is only exported without DP noise
                "sum": latency_sum if eps is None else None,
            },
            "predicted_class": raw["classes"],
            "ood_score": None
            if raw["ood"] is None
            else {"edges": list(self._ood_edges or ()), "counts": raw["ood"]},
            "drift": self._drift(raw["classes"], raw["ood"]),
            "privacy": {
                "epsilon_per_family": eps,
                "families": list(_FAMILIES),
                "epsilon_per_snapshot": None if eps is None else eps * len(_FAMILIES),
                "unit": "one sample (row) per request",
            },
        }
        return out

    def _drift(self, classes: list[int], ood: list[int] | None) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {}
        for name, live, ref in (
            ("predicted_class", classes, cfg.reference_class_counts),
            ("ood_score", ood, cfg.reference_ood_counts),
        ):
            if ref is None or live is None:
                out[name] = None
                continue
            n = int(sum(live))
            if n < cfg.min_samples:  # too few samples for PSI to mean anything: count only
                out[name] = {"psi": None, "alert": False, "n": n, "min_samples": cfg.min_samples}
                continue
            value = psi(live, ref)
            out[name] = {"psi": value, "alert": value > cfg.psi_alert, "n": n,
                         "min_samples": cfg.min_samples}
        return out


def _noised(v: Any, eps: float, rng: np.random.Generator) -> Any:
    """Laplace(1/eps) per count, rounded and clipped at 0 (post-processing keeps DP)."""
    if v is None:
        return None
    if isinstance(v, dict):
        return {k: _noised(c, eps, rng) for k, c in v.items()}
    if isinstance(v, list):
        return [_noised(c, eps, rng) for c in v]
    return max(0, int(round(v + rng.laplace(0.0, 1.0 / eps))))
