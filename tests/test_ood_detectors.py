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


def test_conformal_threshold_is_the_smallest_order_statistic_meeting_the_guarantee():
    from scipy.stats import beta

    scores = np.arange(1.0, 201.0)[::-1]  # order must not matter
    t = conformal_threshold(scores, 0.05, slack=0.01, delta=0.1)
    assert t.n == 200 and t.threshold == float(t.k)  # the k-th smallest score

    def tail(k: int) -> float:  # P(true FRR > 6%) at order statistic k
        return beta.sf(0.06, 201 - k, k)

    assert tail(t.k) <= 0.1 < tail(t.k - 1)
    assert t.k >= math.ceil(201 * 0.95)  # never below the marginal split-conformal rank
    d = t.to_dict()
    assert d["method"] == "pac_conformal" and d["frr_bound"] == pytest.approx(0.06)


def test_too_small_calibration_set_is_refused_not_inf():
    from hardening.ood.calibration import CalibrationTooSmall, min_calibration_size

    need = min_calibration_size(0.01, 0.01, 0.1)
    assert need == 114  # (1 - 0.02)^n <= 0.1
    conformal_threshold(np.arange(float(need)), 0.01)
    with pytest.raises(CalibrationTooSmall, match="needs at least 114"):
        conformal_threshold(np.arange(float(need - 1)), 0.01)
    assert issubclass(CalibrationTooSmall, InputError)  # exit 2 at the CLI


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_conformal_threshold_refuses_bad_alpha(alpha):
    with pytest.raises(InputError):
        conformal_threshold(np.arange(100.0), alpha)


def test_pac_guarantee_holds_over_calibration_draws(rng):
    """Gaussian scores: the true FRR of a threshold t is 1 - Phi(t), known exactly. Over
    400 calibration sets of 200, FRR exceeds alpha + slack in at most delta of them
    (+ Monte-Carlo noise), and the average FRR stays at or below alpha."""
    from scipy.stats import norm

    alpha, slack, delta, frr = 0.05, 0.01, 0.1, []
    for _ in range(400):
        frr.append(norm.sf(conformal_threshold(rng.normal(size=200), alpha, slack, delta).threshold))
    frr = np.array(frr)
    assert np.mean(frr > alpha + slack) <= delta + 3 * np.sqrt(delta * (1 - delta) / 400)
    assert np.mean(frr) <= alpha


def test_rate_interval_covers_the_observed_rate():
    from hardening.ood.calibration import rate_interval

    lo, hi = rate_interval(6, 200)
    assert lo < 0.03 < hi and hi - lo < 0.06
    assert rate_interval(0, 50)[0] == 0.0 and rate_interval(50, 50)[1] == 1.0


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


def test_ensemble_fuses_mean_of_positive_z_scores(rng):
    def draw(n):
        x, y = _blobs(rng, n)
        return ModelViews(x, np.eye(3)[y] * 5 + rng.normal(size=(n, 3)), x[:, :4]), y

    train, y = draw(400)
    views, _ = draw(400)  # not the training points: their kNN distances would be 0 up to float32 noise
    ens = DetectorEnsemble()
    assert set(ens.detectors) == set(DETECTORS) and "msp" not in ens.fused
    ens.fit(train, y)
    with pytest.raises(NotFittedError):
        ens.score(views)
    ens.fit_normalisation(views.take(np.arange(200))).calibrate(views.take(np.arange(200, 400)), 0.1)
    by = ens.scores_by_detector(views)
    # z-scores against the normalisation split, with the ensemble's documented std floor
    z = [(by[n] - by[n][:200].mean()) / max(by[n][:200].std(), 1e-12) for n in ens.fused]
    want = np.mean(np.maximum(z, 0.0), axis=0)  # one-sided: no detector cancels another
    np.testing.assert_allclose(ens.score(views), want, rtol=0, atol=1e-4)  # float32 products, batch 200 vs 400
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


def test_mahalanobis_matrix_form_equals_the_definition(rng):
    x, y = _blobs(rng, 300, d=12)
    det = MahalanobisDetector().fit(x, y)
    t = rng.normal(size=(40, 12)) * 3
    d = t[:, None, :] - det.means_[None, :, :]
    want = np.einsum("ncd,de,nce->nc", d, det.precision_, d).min(axis=1)
    np.testing.assert_allclose(det.score_samples(t), want, rtol=1e-5, atol=1e-4)  # float32 factor
