"""Telemetry: aggregates only, drift as PSI against bundle references, optional Laplace noise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hardening.intake import make_session
from runtime_guard.anomaly import AnomalyScorer
from runtime_guard.config import (
    AnomalyGateConfig,
    ExtractionMonitorConfig,
    GuardConfig,
    RateLimitConfig,
    TelemetryConfig,
)
from runtime_guard.guard import GuardedModel
from runtime_guard.telemetry import DECISIONS, REASON_CODES, Telemetry, psi
from runtime_guard.verdict import Decision, Reason, Verdict

from test_guard import build_detectors  # pytest puts tests/ on sys.path (no tests/__init__.py)


def test_psi_basics():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([30, 20, 10], [10, 20, 30]) > 0.25
    assert 0 < psi([11, 20, 29], [10, 20, 30]) < 0.01
    assert np.isfinite(psi([0, 0, 5], [5, 5, 0]))  # empty bins are floored
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_record_and_snapshot_shapes():
    t = Telemetry(TelemetryConfig(ood_edges=(-1.0, 0.0, 1.0)), num_classes=3)
    t.record(Verdict(Decision.ACCEPTED), 0.0002, np.array([0, 2, 2]), np.array([-2.0, 0.5, 5.0]))
    t.record(Verdict.refused(Decision.REJECTED, Reason.INPUT_RANGE), 0.00003)
    t.record(Verdict(Decision.FLAGGED, (Reason.OOD, Reason.EXTRACTION)), 0.2, np.array([1]), np.array([0.0]))
    s = t.snapshot()
    json.dumps(s)  # plain JSON types
    assert s["requests_total"] == 3
    assert set(s["decisions"]) == set(DECISIONS) and s["decisions"]["rejected"] == 1
    assert set(s["reasons"]) == set(REASON_CODES) and s["reasons"]["ood"] == 1
    assert s["predicted_class"] == [1, 1, 2]
    assert s["ood_score"]["counts"] == [1, 0, 2, 1]  # (-inf,-1) [-1,0) [0,1) [1,inf)
    assert sum(s["latency_seconds"]["counts"]) == 3 and s["latency_seconds"]["counts"][-1] == 1
    assert s["drift"] == {"predicted_class": None, "ood_score": None}
    assert s["privacy"]["epsilon_per_family"] is None


def test_laplace_noise_is_applied_with_stated_epsilon():
    cfg = TelemetryConfig(epsilon=0.5, reference_class_counts=(1, 1))
    t = Telemetry(cfg, num_classes=2)
    for i in range(1000):
        t.record(Verdict(Decision.ACCEPTED), 0.0001, np.array([i % 2]))
    snaps = [t.snapshot(np.random.default_rng(s)) for s in range(200)]
    req = np.array([s["requests_total"] for s in snaps])
    assert len(set(req.tolist())) > 5, "counts must actually be noised"
    # Laplace(1/eps = 2): mean ~1000, mean absolute deviation ~2
    assert abs(req.mean() - 1000) < 1.0 and 1.0 < np.abs(req - 1000).mean() < 3.5
    s = snaps[0]
    assert s["privacy"]["epsilon_per_family"] == 0.5
    assert s["privacy"]["epsilon_per_snapshot"] == 0.5 * len(s["privacy"]["families"])
    assert s["latency_seconds"]["sum"] is None  # unbounded sum is withheld under DP
    assert all(c >= 0 for c in s["predicted_class"])
    assert s["drift"]["predicted_class"]["psi"] < 0.05


def test_reference_length_must_match_model():
    with pytest.raises(ValueError, match="classes"):
        Telemetry(TelemetryConfig(reference_class_counts=(1, 2, 3)), num_classes=6)


def test_drift_alerts_on_ood_traffic_not_on_test_traffic(digits_demo):
    sess = make_session(digits_demo.model_path)
    with np.load(digits_demo.data_path) as d:
        data = {k: d[k] for k in d.files}
    npz, meta = build_detectors(sess, data)
    scorer = AnomalyScorer.from_bytes(npz, meta)
    # References from the calibration split, as the release pipeline would compute them.
    cal_logits = sess.run(["logits"], {"input": data["x_cal"]})[0]
    cal_scores = scorer.score(data["x_cal"], cal_logits, None)
    edges = tuple(float(e) for e in np.quantile(cal_scores, np.linspace(0.1, 0.9, 9)))
    ref_ood = np.histogram(cal_scores, bins=[-np.inf, *edges, np.inf])[0]
    ref_cls = np.bincount(cal_logits.argmax(1), minlength=6)
    cfg = GuardConfig(
        rate_limit=RateLimitConfig(per_client=None),
        extraction=ExtractionMonitorConfig(enabled=False),
        anomaly=AnomalyGateConfig(action="flag", detector_meta=meta),
        telemetry=TelemetryConfig(
            ood_edges=edges,
            reference_ood_counts=tuple(int(c) for c in ref_ood),
            reference_class_counts=tuple(int(c) for c in ref_cls),
        ),
    )
    guard = GuardedModel(Path(digits_demo.model_path).read_bytes(), GuardConfig.from_dict(cfg.to_dict()), scorer)
    for x in data["x"]:
        guard.predict(x, "c")
    calm = guard.snapshot()
    assert not calm["drift"]["ood_score"]["alert"] and calm["drift"]["ood_score"]["psi"] < 0.25
    assert not calm["drift"]["predicted_class"]["alert"]
    guard.telemetry.reset()
    for x in data["ood_heldout"][:200]:
        guard.predict(x, "secret-client-42")
    shifted = guard.snapshot()
    assert shifted["drift"]["ood_score"]["alert"], shifted["drift"]
    assert shifted["drift"]["ood_score"]["psi"] > 4 * calm["drift"]["ood_score"]["psi"]
    # nothing sample-level leaks into the snapshot
    text = json.dumps(shifted)
    assert "secret-client-42" not in text and shifted["requests_total"] == 200
