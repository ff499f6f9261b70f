"""Conformal thresholds with a stated guarantee for *this* calibration set.

Plain split conformal (k = ceil((n+1)(1-alpha))) bounds the false-rejection rate only on
average over calibration sets; one unlucky set of 100-200 scores can give a gate that
rejects twice the target. For a threshold at the k-th smallest of n exchangeable scores,
the true false-rejection rate is distributed Beta(n+1-k, k) (Vovk 2012, "conditional
validity"; Bates et al. 2021, PAC prediction sets). We pick the smallest k with

    P(true FRR > alpha + slack) <= delta,

and never a k below the marginal one, so both guarantees hold. When even k = n cannot
meet it, the calibration set is too small for the target: we refuse rather than ship a
threshold of +inf that silently rejects nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

from hardening.errors import InputError

DEFAULT_SLACK = 0.01  # absolute: at a 5% target, "more than 6% rejected" is the failure
DEFAULT_DELTA = 0.10  # ... and it may happen for at most 1 calibration set in 10


class CalibrationTooSmall(InputError):
    """The calibration split cannot support the requested false-rejection guarantee."""


@dataclass(frozen=True)
class ConformalThreshold:
    """``threshold`` is the k-th smallest of ``n`` calibration scores; with probability at
    least ``1 - delta`` over the calibration draw, the false-rejection rate on exchangeable
    in-distribution inputs is at most ``alpha + slack`` (and at most ``alpha`` on average)."""

    threshold: float
    k: int
    n: int
    alpha: float
    slack: float = DEFAULT_SLACK
    delta: float = DEFAULT_DELTA

    @property
    def frr_bound(self) -> float:
        return self.alpha + self.slack

    @property
    def expected_frr(self) -> float:
        """Mean of the true false-rejection rate over calibration draws: (n+1-k)/(n+1)."""
        return (self.n + 1 - self.k) / (self.n + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold  # JSON has no inf
        d.update(method="pac_conformal", frr_bound=self.frr_bound, expected_frr=self.expected_frr)
        return d


def check_alpha(alpha: float) -> float:
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise InputError(f"alpha must be a false-rejection rate in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_guarantee(alpha: float, slack: float, delta: float) -> None:
    if not (isinstance(slack, (int, float)) and 0.0 <= slack and alpha + slack < 1.0):
        raise InputError(f"slack must be >= 0 with alpha + slack < 1, got {slack!r}")
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise InputError(f"delta must be a probability in (0, 1), got {delta!r}")


def min_calibration_size(alpha: float, slack: float = DEFAULT_SLACK, delta: float = DEFAULT_DELTA) -> int:
    """Fewest calibration scores for which some k meets the guarantee (k = n: (1-bound)^n <= delta)."""
    bound = alpha + slack
    pac = math.ceil(math.log(delta) / math.log1p(-bound))
    marginal = math.ceil(1.0 / alpha - 1.0)  # (n+1)(1-alpha) <= n
    return max(pac, marginal, 1)


def violation_probability(n: int, k: int, bound: float) -> float:
    """P(true FRR > bound) for a threshold at the k-th smallest of n scores."""
    return float(beta.sf(bound, n + 1 - k, k))


def conformal_threshold(scores: np.ndarray, alpha: float, slack: float = DEFAULT_SLACK,
                        delta: float = DEFAULT_DELTA) -> ConformalThreshold:
    """Raises ``CalibrationTooSmall`` (exit 2) when ``scores`` are too few for the guarantee."""
    alpha = check_alpha(alpha)
    _check_guarantee(alpha, slack, delta)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise InputError("calibration scores must be a non-empty finite array")
    n = int(s.size)
    ks = np.arange(1, n + 1)
    ok = np.flatnonzero(beta.sf(alpha + slack, n + 1 - ks, ks) <= delta)
    k_marginal = math.ceil((n + 1) * (1.0 - alpha))
    if ok.size == 0 or k_marginal > n:
        need = min_calibration_size(alpha, slack, delta)
        raise CalibrationTooSmall(
            f"{n} calibration scores are too few for a {alpha:.2%} false-rejection target: guaranteeing "
            f"P(FRR > {alpha + slack:.2%}) <= {delta:.0%} needs at least {need}; add calibration data "
            "(x_cal), raise the target, or widen slack/delta")
    k = max(int(ks[ok[0]]), k_marginal)
    return ConformalThreshold(threshold=float(s[k - 1]), k=k, n=n, alpha=alpha, slack=float(slack), delta=float(delta))


def false_rejection_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of in-distribution inputs the gate would reject (score > threshold)."""
    return float(np.mean(np.asarray(scores) > threshold))


def rate_interval(rejected: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval for an observed rejection count (exact, never too narrow)."""
    if n <= 0:
        return (0.0, 1.0)
    a = (1.0 - level) / 2.0
    lo = 0.0 if rejected == 0 else float(beta.ppf(a, rejected, n - rejected + 1))
    hi = 1.0 if rejected == n else float(beta.ppf(1.0 - a, rejected + 1, n - rejected))
    return (lo, hi)
