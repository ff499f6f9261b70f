"""Split-conformal thresholds: reject honest traffic at (at most) the rate the user chose."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from hardening.errors import InputError


@dataclass(frozen=True)
class ConformalThreshold:
    """``threshold`` is the k-th smallest of ``n`` calibration scores, k = ceil((n+1)(1-alpha)).

    If k > n (too few calibration scores for this alpha) the threshold is +inf:
    nothing is rejected, which is the only choice that keeps the guarantee.
    """

    threshold: float
    k: int
    n: int
    alpha: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold  # JSON has no inf
        return d


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise InputError(f"alpha must be a false-rejection rate in (0, 1), got {alpha!r}")
    return float(alpha)


def conformal_threshold(scores: np.ndarray, alpha: float) -> ConformalThreshold:
    """For exchangeable in-distribution inputs, P(score > threshold) <= alpha."""
    alpha = check_alpha(alpha)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise InputError("calibration scores must be a non-empty finite array")
    n = int(s.size)
    k = math.ceil((n + 1) * (1.0 - alpha))
    thr = float(s[k - 1]) if k <= n else math.inf
    return ConformalThreshold(threshold=thr, k=k, n=n, alpha=alpha)


def false_rejection_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of in-distribution inputs the gate would reject (score > threshold)."""
    return float(np.mean(np.asarray(scores) > threshold))
