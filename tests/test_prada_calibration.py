"""PRADA calibrated on benign streams (issue #16 item 2): measured false flags and detection.

Quick profile here (few clients, 5% target); the 1%-target run with 100+ clients per
stream kind is the slow test, and its figures are in docs/extraction.md.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from hardening.data import load_dataset
from hardening.errors import InputError
from hardening.ood import fit_ood
from hardening.prada_calibration import BENIGN, THIEVES, calibrate_prada
from runtime_guard.anomaly import AnomalyScorer
from runtime_guard.config import ExtractionMonitorConfig, GuardConfigError


@pytest.fixture(scope="module")
def deployed(digits_demo, tmp_path_factory):
    det = tmp_path_factory.mktemp("prada_det")
    fit_ood(digits_demo.model_path, digits_demo.data_path, det, alpha=0.05)
    scorer = AnomalyScorer.load(det)
    sess = ort.InferenceSession(str(digits_demo.model_path), providers=["CPUExecutionProvider"])

    def label(x):
        lg, ft = sess.run(["logits", "features"], {"input": np.ascontiguousarray(x, np.float32)})
        return lg.argmax(1), scorer.is_anomalous(scorer.score(x.reshape(len(x), -1), lg, ft))

    ds = load_dataset(digits_demo.data_path)
    return ds, label


def _check(r, target: float) -> None:
    assert set(r.false_flag_rate) == set(BENIGN) and set(r.detection_rate) == set(THIEVES)
    cfg = ExtractionMonitorConfig.from_dict(r.config)  # what ships must be a valid monitor config
    assert cfg.center is not None and len(cfg.center) == 64
    for k in THIEVES:  # every thief reported on its own, and "detects nothing" said where true
        if r.detection_rate[k] == 0:
            assert any(n.startswith(f"{k}: detected by no signal") for n in r.notes)
    assert r.detection_rate["uniform_noise"] >= 0.9  # the gate-rejection signal catches noise


def test_quick_calibration_reports_every_stream_and_signal(deployed):
    ds, label = deployed
    pool = np.concatenate([ds.x_cal, ds.x])
    r = calibrate_prada(pool, ds.x_train, label, target=0.05, clients_per_kind=10, calibration_clients_per_kind=60, stream_length=100,
                        min_queries_grid=(50,), seed=1)
    _check(r, 0.05)
    assert r.min_queries == 50 and r.n_calibration_clients == 180


def test_too_few_clients_for_the_target_is_refused(deployed):
    ds, label = deployed
    with pytest.raises(InputError, match="too few"):
        calibrate_prada(ds.x_cal, ds.x_train, label, target=0.01, clients_per_kind=5, stream_length=60,
                        min_queries_grid=(50,))


def test_monitor_config_refuses_half_a_standardisation():
    with pytest.raises(GuardConfigError):
        ExtractionMonitorConfig(center=(0.0,), scale=None)
    with pytest.raises(GuardConfigError):
        ExtractionMonitorConfig(center=(0.0, 1.0), scale=(1.0,))
    with pytest.raises(GuardConfigError):
        ExtractionMonitorConfig(center=(0.0,), scale=(0.0,))


@pytest.mark.slow
def test_one_percent_target_holds_on_100_honest_clients_per_kind(deployed):
    ds, label = deployed
    pool = np.concatenate([ds.x_cal, ds.x])
    r = calibrate_prada(pool, ds.x_train, label, target=0.01, clients_per_kind=100, calibration_clients_per_kind=300,
                        stream_length=200, seed=0)
    _check(r, 0.01)
    for k in BENIGN:
        assert r.false_flag_rate[k] <= 0.03, (k, r.false_flag_rate)  # 1% target, 100 clients: binomial room


# -- PRADA on penultimate features (issue #16 item 4)


def test_features_space_is_calibrated_the_same_way_and_reported_beside_inputs(digits_demo):
    from hardening.intake import load_model, make_session
    from hardening.prada_calibration import compare_spaces

    info = load_model(digits_demo.model_path)
    ds = load_dataset(digits_demo.data_path)
    res = compare_spaces(make_session(digits_demo.model_path), info, ds, None, target=0.05, clients_per_kind=10,
                         calibration_clients_per_kind=60, stream_length=100)
    assert set(res) == {"standardized", "features"}
    feat = res["features"]
    cfg = ExtractionMonitorConfig.from_dict(feat.config)
    assert cfg.space == "features" and cfg.center is not None and len(cfg.center) == 128  # the demo's feature dim
    assert ExtractionMonitorConfig.from_dict(res["standardized"].config).space == "input"
    for r in res.values():  # every thief, each signal, per space
        assert set(r.detection_rate) == set(THIEVES) and all(set(v) == {"prada", "rejections", "label_entropy"}
                                                              for v in r.detection_by_signal.values())
    with pytest.raises(GuardConfigError):
        ExtractionMonitorConfig(space="logits")


def test_guard_feeds_the_monitor_its_features_when_asked(digits_demo):
    from runtime_guard.config import GuardConfig, RateLimitConfig
    from runtime_guard.extraction_monitor import ExtractionMonitor
    from runtime_guard.guard import GuardedModel

    sess = ort.InferenceSession(str(digits_demo.model_path), providers=["CPUExecutionProvider"])
    x = load_dataset(digits_demo.data_path).x[:60]
    mon = ExtractionMonitorConfig(min_queries=20, test_every=10, space="features")
    guard = GuardedModel(sess, GuardConfig(rate_limit=RateLimitConfig(per_client=None), extraction=mon))
    for row in x:
        guard.predict(row[None], "c")
    lg, ft = sess.run(["logits", "features"], {"input": x})
    ref = ExtractionMonitor(mon)
    for i in range(len(x)):
        ref.observe("c", ft[i:i + 1], lg[i:i + 1].argmax(1))
    got, want = guard.monitor_state("c"), ref.state("c")
    assert got.distances == want.distances > 0 and got.last_w == pytest.approx(want.last_w, rel=1e-9)
