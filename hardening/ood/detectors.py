"""Single OOD detectors with a scikit-learn-like interface.

Score sign: as ``runtime_guard.anomaly`` defines it (higher = more anomalous;
this differs from scikit-learn's ``score_samples``). Every detector reads one *view* of an input:
``"logits"`` (model output), ``"features"`` (penultimate activations) or
``"input"`` (the compact input view fixed at fit time, ``runtime_guard.anomaly.InputView``). ``fit`` learns from in-distribution
training data only; ``calibrate`` sets ``threshold_`` (split-conformal) so that
``predict`` can say "anomalous" (1) or "in distribution" (0).

Fitting is here (scikit-learn); scoring is not: ``fit`` exports its state
(``export()``: plain float arrays plus a small JSON-able dict) into the
runtime's detector class (``runtime_``), and ``score_samples`` is that class's
``raw``, so the maths exists once, in ``runtime_guard.anomaly``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError

from hardening.errors import DataError
from hardening.ood.budget import GateBudget
from hardening.ood.calibration import DEFAULT_DELTA, DEFAULT_SLACK, conformal_threshold
from runtime_guard import anomaly as runtime

# Size budget of one detector's exported matrix (values, ``GateBudget.matrix_values``): a bank
# of B rows of width D has B*D, a Mahalanobis factor D*r, PCA components r*D. It bounds the
# batch-1 cost of the gate (one float32 matrix product per view) and the bundle size whatever the model.
MAX_MATRIX_VALUES = GateBudget().matrix_values


def _as_2d(X: np.ndarray, name: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim < 2 or X.shape[0] == 0:
        raise DataError(f"{name}: expected a non-empty (n, ...) array, got shape {X.shape}")
    X = X.reshape(len(X), -1)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{name}: array holds NaN/Inf values")
    return X


class Detector(BaseEstimator):
    """Base class: subclasses set ``kind``/``view`` and implement ``fit`` (ending in
    ``self._export_runtime()``) and ``export``."""

    kind: ClassVar[str] = ""
    view: ClassVar[str] = ""

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit() first")

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = _as_2d(X, f"{self.kind} {self.view}")
        if X.shape[1] != self.n_features_in_:
            raise DataError(f"{self.kind}: {self.view} has {X.shape[1]} values per sample, fitted on {self.n_features_in_}")
        return X

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> Detector:  # pragma: no cover - abstract
        raise NotImplementedError

    def _export_runtime(self) -> None:
        """Build ``runtime_``, the device's detector for this fitted state (unit normalisation)."""
        arrays, params = self.export()
        spec = {"name": self.kind, "kind": self.kind, "view": self.view, "params": params,
                "norm": {"mean": 0.0, "std": 1.0}}
        self.runtime_ = runtime.build_detector(
            spec, {f"{self.kind}__{k}": np.asarray(v, np.float32) for k, v in arrays.items()})

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score per sample (runtime maths; higher = more anomalous)."""
        X = self._check_X(X)  # NotFittedError before runtime_ exists
        return self.runtime_.raw(X)

    def export(self) -> tuple[dict[str, np.ndarray], dict]:
        """Fitted state as (float arrays, JSON-able params) for the numpy runtime."""
        raise NotImplementedError  # pragma: no cover

    def calibrate(self, X: np.ndarray, alpha: float, slack: float = DEFAULT_SLACK,
                  delta: float = DEFAULT_DELTA) -> Detector:
        """Set ``threshold_`` to the PAC-conformal order statistic of in-distribution scores."""
        self.calibration_ = conformal_threshold(self.score_samples(X), alpha, slack, delta)
        self.threshold_ = self.calibration_.threshold
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 = anomalous (score above ``threshold_``), 0 = in distribution."""
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"{type(self).__name__} has no threshold_; call calibrate() first")
        return (self.score_samples(X) > self.threshold_).astype(np.int64)


class MSPDetector(Detector):
    """1 - maximum softmax probability (Hendrycks & Gimpel 2017)."""

    kind = "msp"
    view = "logits"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> MSPDetector:
        self.n_features_in_ = _as_2d(X, "msp logits").shape[1]
        self._export_runtime()
        return self

    def export(self) -> tuple[dict[str, np.ndarray], dict]:
        return {}, {"temperature": float(self.temperature)}


class EnergyDetector(Detector):
    """Negative free energy ``-T logsumexp(logits / T)`` (Liu et al. 2020)."""

    kind = "energy"
    view = "logits"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> EnergyDetector:
        self.n_features_in_ = _as_2d(X, "energy logits").shape[1]
        self._export_runtime()
        return self

    def export(self) -> tuple[dict[str, np.ndarray], dict]:
        return {}, {"temperature": float(self.temperature)}


class MahalanobisDetector(Detector):
    """Min over classes of the Mahalanobis distance with one tied covariance (Lee et al. 2018).

    Exported as a factor ``W`` of the precision (``W W^T = P``, by the covariance's
    eigendecomposition) and the projected class means: exact while ``D * (D + C)`` fits
    ``max_values``; above it (e.g. 1024-d MobileNet features) ``W`` keeps the ``r =
    max_values // D - C`` directions of largest variance (the device's product holds ``W``
    and the ``C`` class cross terms), recorded as ``rank_``."""

    kind = "mahalanobis"
    view = "features"

    def __init__(self, covariance: str = "ledoit_wolf", max_values: int = MAX_MATRIX_VALUES) -> None:
        self.covariance = covariance
        self.max_values = max_values

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> MahalanobisDetector:
        X = _as_2d(X, "mahalanobis features")
        if y is None or len(y) != len(X):
            raise DataError("mahalanobis: needs one class label per training sample (y_train)")
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 1:
            raise DataError("mahalanobis: no classes in training labels")
        self.means_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])
        centred = X - self.means_[np.searchsorted(self.classes_, y)]
        est = {"ledoit_wolf": LedoitWolf, "empirical": EmpiricalCovariance}.get(self.covariance)
        if est is None:
            raise DataError(f"mahalanobis: covariance must be 'ledoit_wolf' or 'empirical', got {self.covariance!r}")
        fitted = est(assume_centered=True).fit(centred)
        self.precision_ = fitted.precision_
        d = X.shape[1]
        # the device's product holds W (D x r) and the class cross terms (D x C): D * (r + C) within the budget
        self.rank_ = int(min(d, max(1, self.max_values // d - len(self.classes_))))
        var, vec = np.linalg.eigh(fitted.covariance_)
        top = np.argsort(var)[::-1][: self.rank_]
        self.factor_ = vec[:, top] / np.sqrt(np.maximum(var[top], 1e-12))
        self.n_features_in_ = d
        self._export_runtime()
        return self

    def export(self) -> tuple[dict[str, np.ndarray], dict]:
        return {"factor": self.factor_, "centers": self.means_ @ self.factor_}, {"rank": self.rank_,
                                                                               "max_values": int(self.max_values)}


class _KNNBase(Detector):
    """Distance to the k-th nearest training sample, from a bounded reference bank."""

    normalize: ClassVar[bool] = False

    def __init__(self, n_neighbors: int = 1, max_bank: int = 1000, max_values: int = MAX_MATRIX_VALUES,
                 random_state: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.max_bank = max_bank
        self.max_values = max_values
        self.random_state = random_state

    def _prep(self, X: np.ndarray) -> np.ndarray:
        if self.normalize:
            return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> _KNNBase:
        X = _as_2d(X, f"{self.kind} {self.view}")
        # bank bounded by rows and by the matrix budget: batch-1 cost and size fixed whatever the data
        self.bank_size_ = int(min(len(X), self.max_bank, max(1, self.max_values // X.shape[1])))
        if not 1 <= self.n_neighbors <= self.bank_size_:
            raise DataError(f"{self.kind}: n_neighbors={self.n_neighbors} needs 1..{self.bank_size_}")
        if len(X) > self.bank_size_:
            idx = np.random.default_rng(self.random_state).choice(len(X), self.bank_size_, replace=False)
            X = X[np.sort(idx)]
        self.bank_ = self._prep(X)
        self.n_features_in_ = X.shape[1]
        self._export_runtime()
        return self

    def export(self) -> tuple[dict[str, np.ndarray], dict]:
        return {"bank": self.bank_}, {"n_neighbors": int(self.n_neighbors), "normalize": self.normalize,
                                      "bank_size": self.bank_size_, "max_values": int(self.max_values)}


class KNNDetector(_KNNBase):
    """k-NN distance on L2-normalised penultimate features (Sun et al. 2022)."""

    kind = "knn"
    view = "features"
    normalize = True


class InputKNNDetector(_KNNBase):
    """k-NN Euclidean distance in raw input space: catches inputs unlike any training sample."""

    kind = "input_knn"
    view = "input"
    normalize = False


class PCAReconstructionDetector(Detector):
    """Squared PCA reconstruction error of the flattened input (input-space detector)."""

    kind = "pca"
    view = "input"

    def __init__(self, n_components: float | int = 0.9, max_values: int = MAX_MATRIX_VALUES) -> None:
        self.n_components = n_components
        self.max_values = max_values

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> PCAReconstructionDetector:
        X = _as_2d(X, "pca input")
        self.pca_ = PCA(n_components=self.n_components, svd_solver="full").fit(X)
        # leading components within the matrix budget (they are sorted by explained variance)
        self.components_ = self.pca_.components_[: max(1, self.max_values // X.shape[1] - 1)]  # + the mean's column
        self.n_features_in_ = X.shape[1]
        self._export_runtime()
        return self

    def export(self) -> tuple[dict[str, np.ndarray], dict]:
        return {"mean": self.pca_.mean_, "components": self.components_}, {"max_values": int(self.max_values)}


DETECTORS: dict[str, type[Detector]] = {
    d.kind: d for d in (MSPDetector, EnergyDetector, MahalanobisDetector, KNNDetector, InputKNNDetector, PCAReconstructionDetector)
}


def default_detectors(budget: GateBudget | None = None) -> dict[str, Detector]:
    """One of each kind, with the settings the docs justify; matrices within ``budget``."""
    dets = {kind: cls() for kind, cls in DETECTORS.items()}
    for det in dets.values():
        if "max_values" in det.get_params():
            det.set_params(max_values=(budget or GateBudget()).matrix_values)
    return dets
