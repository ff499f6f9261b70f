"""Fuse several detectors into one score and calibrate one rejection threshold.

Each detector's score is z-normalised with its mean and standard deviation on an
in-distribution split, then the fused score is the **mean of the members' positive
z-scores**, ``mean_i max(z_i, 0)`` (rule ``mean_pos_z``; the formulas of every rule
are in ``runtime_guard.anomaly``, which this module scores through). One-sided: a
detector that finds an input more typical than typical (z << 0) adds nothing
rather than cancelling the detectors that fire, so an attacker cannot hide an
input-space anomaly behind confident logits. Per family it matches the plain
mean (``benchmarks/bench_fusion.py``, docs/ood.md). Why a mean and not max: on the digits demo the near-OOD family
(held-out digit classes) gives several detectors a moderate shift at once, which
averaging accumulates while the per-detector noise partly cancels; max lets the
noisiest detector set the in-distribution tail (0.965 vs 0.977 AUROC there).
Families only one detector catches (inverted or low-contrast inputs) still pass
because that detector's z-score is many standard deviations out.

MSP is fitted and reported but left out of the fused score by default: it reads
the same logits as the energy score, so including it double-counts logit
evidence in a mean (held-out digits 0.960, low contrast 0.954 with it).

Splits (see ``fit_ood``): detectors fit on train data, normalisation on one half
of the calibration data, the conformal threshold on the other half, so the
threshold's guarantee holds for a score function fixed before it saw those inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import NotFittedError

from hardening.errors import InputError
from hardening.ood.budget import GateBudget
from hardening.ood.calibration import DEFAULT_DELTA, DEFAULT_SLACK, ConformalThreshold, conformal_threshold
from hardening.ood.detectors import Detector, default_detectors
from hardening.ood.views import ModelViews
from runtime_guard.anomaly import InputView, fuse_z

FUSION_RULE = "mean_pos_z"
DEFAULT_FUSED = ("energy", "mahalanobis", "knn", "input_knn", "pca")
_STD_FLOOR = 1e-12


class DetectorEnsemble:
    """Detectors by name; ``fused`` names the members of the fused score."""

    def __init__(self, detectors: dict[str, Detector] | None = None, fused: Sequence[str] | None = None,
                 rule: str = FUSION_RULE, input_view: InputView | None = None, budget: GateBudget | None = None) -> None:
        self.rule = rule
        self.input_view = input_view or InputView()  # how ModelViews.input was made from raw inputs
        self.budget = budget or GateBudget()  # bounds the default detectors' matrices (recorded on export)
        self.detectors = detectors if detectors is not None else default_detectors(self.budget)
        self.fused = tuple(fused) if fused is not None else tuple(n for n in DEFAULT_FUSED if n in self.detectors)
        unknown = [n for n in self.fused if n not in self.detectors]
        if unknown or not self.fused:
            raise InputError(f"fused members must be non-empty detector names; unknown: {unknown}")

    @property
    def views_needed(self) -> set[str]:
        return {self.detectors[n].view for n in self.detectors}

    def fit(self, train: ModelViews, y: np.ndarray) -> DetectorEnsemble:
        for det in self.detectors.values():
            det.fit(train.get(det.view), y)
        return self

    def scores_by_detector(self, views: ModelViews) -> dict[str, np.ndarray]:
        return {name: det.score_samples(views.get(det.view)) for name, det in self.detectors.items()}

    def fit_normalisation(self, views: ModelViews) -> DetectorEnsemble:
        """Per-detector mean/std on in-distribution data (must not be the threshold split)."""
        scores = self.scores_by_detector(views)
        self.norm_mean_ = {n: float(s.mean()) for n, s in scores.items()}
        self.norm_std_ = {n: float(max(s.std(), _STD_FLOOR)) for n, s in scores.items()}
        return self

    def fuse(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        if not hasattr(self, "norm_mean_"):
            raise NotFittedError("ensemble normalisation is not fitted; call fit_normalisation() first")
        z = np.stack([(scores[n] - self.norm_mean_[n]) / self.norm_std_[n] for n in self.fused], axis=1)
        return fuse_z(z, self.rule)

    def score(self, views: ModelViews) -> np.ndarray:
        """Fused anomaly score; higher = more anomalous."""
        return self.fuse(self.scores_by_detector(views))

    def calibrate(self, views: ModelViews, alpha: float, slack: float = DEFAULT_SLACK,
                  delta: float = DEFAULT_DELTA) -> DetectorEnsemble:
        """PAC-conformal thresholds for the fused score and for each detector alone."""
        scores = self.scores_by_detector(views)
        self.calibration_: ConformalThreshold = conformal_threshold(self.fuse(scores), alpha, slack, delta)
        self.threshold_ = self.calibration_.threshold
        self.alpha_ = self.calibration_.alpha
        self.detector_calibration_ = {n: conformal_threshold(s, alpha, slack, delta) for n, s in scores.items()}
        for n, det in self.detectors.items():
            det.calibration_ = self.detector_calibration_[n]
            det.threshold_ = det.calibration_.threshold
        return self

    def predict(self, views: ModelViews) -> np.ndarray:
        if not hasattr(self, "threshold_"):
            raise NotFittedError("ensemble has no threshold_; call calibrate() first")
        return (self.score(views) > self.threshold_).astype(np.int64)
