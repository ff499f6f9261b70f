"""Rollback triggers for a hot update on probation, from the guard's local telemetry.

The error-rate rule lives in ``api.reload`` (it counts HTTP outcomes); these rules read
``Telemetry.snapshot()`` of the new deployment against a *reference*: the previous
deployment's own snapshot taken at the swap (what this device saw with the bundle it is
replacing) and the signed calibration references inside the new bundle (drift PSI).

* rejection / OOD spike: share of requests rejected or flagged rises by more than
  ``max_rejection_increase`` (absolute) over the reference share;
* latency regression: mean guarded latency over ``max_latency_ratio`` x the reference
  and at least ``min_latency_increase_s`` slower (sub-millisecond jitter is no regression);
* drift: predicted-class PSI against the bundle's signed reference above ``max_psi``
  (and above the previous deployment's own PSI, which would otherwise blame the traffic).

Each rule needs ``min_requests`` requests on the new deployment before it may fire.
Noised (differentially private) snapshots withhold the latency sum: that rule then
reports ``unavailable`` instead of guessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ProbationRules:
    min_requests: int = 20
    max_rejection_increase: float = 0.25
    max_latency_ratio: float = 3.0
    min_latency_increase_s: float = 0.005
    max_psi: float = 0.5

    def __post_init__(self) -> None:
        if self.min_requests < 1 or not 0 < self.max_rejection_increase <= 1:
            raise ValueError("min_requests must be >= 1 and max_rejection_increase within (0, 1]")
        if self.max_latency_ratio <= 1 or self.max_psi <= 0 or self.min_latency_increase_s < 0:
            raise ValueError("max_latency_ratio must be > 1, max_psi > 0, min_latency_increase_s >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Figures:
    """What the rules compare, from one telemetry snapshot."""

    requests: int
    rejection_rate: float | None
    latency_mean_s: float | None
    psi: float | None

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any] | None) -> "Figures":
        if not snap:
            return cls(0, None, None, None)
        n = int(snap.get("requests_total") or 0)
        dec = snap.get("decisions") or {}
        rej = int(dec.get("rejected", 0)) + int(dec.get("flagged", 0))
        lat = snap.get("latency_seconds") or {}
        counted = sum(lat.get("counts") or [])
        mean = lat["sum"] / counted if lat.get("sum") is not None and counted else None
        drift = (snap.get("drift") or {}).get("predicted_class") or {}
        return cls(n, rej / n if n else None, mean, drift.get("psi"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """``trigger`` is None while the deployment looks healthy; evidence always says why."""

    trigger: str | None
    evidence: dict[str, Any]


def judge(live: Figures, reference: Figures, rules: ProbationRules) -> Verdict:
    checks: dict[str, Any] = {}
    fired: str | None = None
    enough = live.requests >= rules.min_requests

    ref_rate = reference.rejection_rate if reference.requests >= rules.min_requests else 0.0
    ref_rate = ref_rate or 0.0
    if live.rejection_rate is None or not enough:
        checks["rejection_rate"] = {"status": "waiting"}
    else:
        bad = live.rejection_rate - ref_rate > rules.max_rejection_increase
        checks["rejection_rate"] = {"status": "fired" if bad else "ok", "live": live.rejection_rate,
                                    "reference": ref_rate, "max_increase": rules.max_rejection_increase}
        fired = fired or ("rejection_rate" if bad else None)

    if live.latency_mean_s is None or reference.latency_mean_s is None:
        checks["latency"] = {"status": "unavailable"}
    elif not enough:
        checks["latency"] = {"status": "waiting"}
    else:
        ratio = live.latency_mean_s / max(reference.latency_mean_s, 1e-9)
        bad = (ratio > rules.max_latency_ratio
               and live.latency_mean_s - reference.latency_mean_s > rules.min_latency_increase_s)
        checks["latency"] = {"status": "fired" if bad else "ok", "live_mean_s": live.latency_mean_s,
                             "reference_mean_s": reference.latency_mean_s, "ratio": ratio,
                             "max_ratio": rules.max_latency_ratio}
        fired = fired or ("latency" if bad else None)

    if live.psi is None:
        checks["drift_psi"] = {"status": "waiting"}
    else:
        bad = live.psi > rules.max_psi and (reference.psi is None or live.psi > reference.psi)
        checks["drift_psi"] = {"status": "fired" if bad else "ok", "live": live.psi,
                               "reference": reference.psi, "max": rules.max_psi}
        fired = fired or ("drift_psi" if bad else None)
    return Verdict(fired, {"requests": live.requests, "checks": checks})
