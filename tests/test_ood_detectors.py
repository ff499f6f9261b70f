"""Unit tests of single detectors, conformal calibration and fusion on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from hardening.errors import DataError, InputError
from hardening.ood import (
    DETECTORS,
    DetectorEnsemble,
    EnergyDetector,
    InputKNNDetector,
    KNNDetector,
    MahalanobisDetector,
    ModelViews,
    MSPDetector,
    PCAReconstructionDetector,
    conformal_threshold,
)



@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh generator per test: results must not depend on which tests ran before."""
    return np.random.default_rng(0)


def test_conformal_threshold_is_kth_smallest():
    scores = np.arange(1.0, 101.0)[::-1]  # order must not matter
    t = conformal_threshold(scores, 0.05)
    assert t.n == 100 and t.k == math.ceil(101 * 0.95) == 96
    assert t.threshold == 96.0


def test_conformal_threshold_inf_when_too_few_scores():
    t = conformal_threshold(np.arange(10.0), 0.05)  # k = ceil(11 * .95) = 11 > 10
    assert t.k == 11 and math.isinf(t.threshold)
    assert t.to_dict()["threshold"] is None


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_conformal_threshold_refuses_bad_alpha(alpha):
    with pytest.raises(InputError):
        conformal_threshold(np.arange(100.0), alpha)


def test_conformal_false_rejection_is_controlled(rng):
    # exchangeable draws: average FRR over repeats must be <= alpha (+ MC noise), and close to it
    alpha, frr = 0.1, []
    for _ in range(300):
        cal, test = rng.normal(size=200), rng.normal(size=2000)
        frr.append(np.mean(test > conformal_threshold(cal, alpha).threshold))
    assert 0.085 <= np.mean(frr) <= alpha + 0.005


def _blobs(rng, n=300, d=8, shift=0.0):
    y = rng.integers(0, 3, n)
    centres = np.eye(3, d) * 6
    return centres[y] + rng.normal(size=(n, d)) + shift, y


@pytest.mark.parametrize("cls", [MahalanobisDetector, KNNDetector, InputKNNDetector, PCAReconstructionDetector])
def test_distance_detectors_score_shifted_data_higher(cls, rng):
    x, y = _blobs(rng)
    xin, _ = _blobs(rng, 100)
    xout, _ = _blobs(rng, 100, shift=4.0)
    det = cls().fit(x, y)
    assert det.score_samples(xout).mean() > det.score_samples(xin).mean() + 1e-3
    assert all(a.endswith("_") for a in vars(det) if a not in det.get_params())


def test_logit_detectors_prefer_confident_logits():
    confident = np.array([[10.0, 0, 0], [0, 12.0, 0]])
    unsure = np.array([[1.0, 1.0, 1.0], [0.2, 0.1, 0.0]])
    for cls in (MSPDetector, EnergyDetector):
        det = cls().fit(confident)
        assert det.score_samples(unsure).min() > det.score_samples(confident).max()


def test_not_fitted_and_not_calibrated(rng):
    det = KNNDetector()
    with pytest.raises(NotFittedError):
        det.score_samples(np.ones((2, 3)))
    det.fit(rng.normal(size=(50, 3)))
    with pytest.raises(NotFittedError):
        det.predict(np.ones((2, 3)))
    det.calibrate(rng.normal(size=(200, 3)), 0.05)
    pred = det.predict(np.r_[np.zeros((1, 3)) + [1, 0, 0], -50 * np.ones((1, 3))])
    assert pred.dtype == np.int64 and set(pred) <= {0, 1}


def test_bad_inputs_raise_data_error(rng):
    det = PCAReconstructionDetector().fit(rng.normal(size=(50, 5)))
    with pytest.raises(DataError, match="5"):
        det.score_samples(np.ones((2, 6)))
    with pytest.raises(DataError, match="NaN"):
        det.score_samples(np.full((2, 5), np.nan))
    with pytest.raises(DataError, match="label"):
        MahalanobisDetector().fit(rng.normal(size=(20, 3)))
    with pytest.raises(DataError, match="n_neighbors"):
        KNNDetector(n_neighbors=30).fit(rng.normal(size=(10, 3)))


def test_knn_bank_is_bounded(rng):
    det = InputKNNDetector(max_bank=100).fit(rng.normal(size=(1000, 4)))
    assert det.bank_.shape == (100, 4)
    arrays, params = det.export()
    assert arrays["bank"].shape == (100, 4) and params["normalize"] is False


def test_ensemble_fuses_mean_of_z_scores(rng):
    x, y = _blobs(rng, 400)
    logits = np.eye(3)[y] * 5 + rng.normal(size=(400, 3))
    views = ModelViews(x, logits, x[:, :4])
    ens = DetectorEnsemble()
    assert set(ens.detectors) == set(DETECTORS) and "msp" not in ens.fused
    ens.fit(views, y)
    with pytest.raises(NotFittedError):
        ens.score(views)
    ens.fit_normalisation(views.take(np.arange(200))).calibrate(views.take(np.arange(200, 400)), 0.1)
    by = ens.scores_by_detector(views)
    # z-scores against the normalisation split, with the ensemble's documented std floor
    want = np.mean([(by[n] - by[n][:200].mean()) / max(by[n][:200].std(), 1e-12) for n in ens.fused], axis=0)
    np.testing.assert_allclose(ens.score(views), want, rtol=1e-10, atol=1e-10)
    assert ens.calibration_.n == 200
    with pytest.raises(InputError):
        DetectorEnsemble(fused=["nope"])


def test_synthetic_families_fit_shape_and_range(rng):
    from hardening.data import dataset_from_arrays
    from hardening.ood.families import natural_patches, synthetic_families

    for shape in [(30,), (1, 8, 8), (3, 6, 5)]:
        x = rng.uniform(-1, 3, (40, *shape)).astype(np.float32)
        ds = dataset_from_arrays({"x": x, "y": np.zeros(40, np.int64)})
        fams = synthetic_families(ds, n=25)
        assert set(fams) == {"uniform", "gaussian", "patches", "inverted", "contrast"}
        for name, arr in fams.items():
            assert arr.shape[1:] == shape and arr.dtype == np.float32, name
            assert arr.min() >= x.min() - 1e-5 and arr.max() <= x.max() + 1e-5, name
    p = natural_patches(50, (1, 8, 8), 0.0, 1.0, np.random.default_rng(1))
    assert p.std() > 0.05 and len({a.tobytes() for a in p}) == 50  # real, varied image content
