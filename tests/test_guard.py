"""GuardedModel end to end on the digits demo: config, anomaly gate, policies, bundle loading."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from hardening.intake import make_session
from runtime_guard.anomaly import FORMAT, AnomalyScorer
from runtime_guard.config import (
    AnomalyGateConfig,
    ExtractionMonitorConfig,
    GuardConfig,
    GuardConfigError,
    InputSchema,
    OutputPolicyConfig,
    RateLimitConfig,
    TelemetryConfig,
)
from runtime_guard.guard import GuardedModel, PredictionResult
from runtime_guard.output_policy import OUTPUT_POLICIES, softmax
from runtime_guard.verdict import Stage

NO_MONITOR = ExtractionMonitorConfig(enabled=False)
NO_LIMIT = RateLimitConfig(per_client=None)


def build_detectors(sess, data: dict) -> tuple[bytes, dict]:
    """Real exported-format detectors: MSP on logits + 1-NN distance in input space to
    the training set, z-normalised and fused; threshold = 95th pct on the calibration split."""
    bank = data["x_train"].reshape(len(data["x_train"]), -1).astype(np.float64)
    buf = io.BytesIO()
    np.savez(buf, **{"knn__bank": bank})
    npz = buf.getvalue()

    def meta(norms: dict, threshold):
        return {
            "format": FORMAT,
            "threshold": threshold,
            "fusion": {"rule": "mean_z", "members": ["msp", "knn"]},
            "detectors": [
                {"name": "msp", "kind": "msp", "view": "logits", "norm": norms["msp"]},
                {
                    "name": "knn",
                    "kind": "input_knn",
                    "view": "input",
                    "norm": norms["knn"],
                    "params": {"n_neighbors": 1, "normalize": False},
                },
            ],
        }

    x_cal = data["x_cal"]
    logits = sess.run(["logits"], {"input": x_cal})[0]
    raw = AnomalyScorer.from_bytes(npz, meta({k: {"mean": 0.0, "std": 1.0} for k in ("msp", "knn")}, None))
    per = raw.scores_by_detector(x_cal, logits, None)
    norms = {k: {"mean": float(v.mean()), "std": float(v.std() + 1e-9)} for k, v in per.items()}
    fused = AnomalyScorer.from_bytes(npz, meta(norms, None)).score(x_cal, logits, None)
    return npz, meta(norms, float(np.quantile(fused, 0.95)))


@pytest.fixture(scope="module")
def digits(digits_demo):
    sess = make_session(digits_demo.model_path)
    with np.load(digits_demo.data_path) as d:
        data = {k: d[k] for k in d.files}
    npz, meta = build_detectors(sess, data)
    return sess, data, npz, meta, open(digits_demo.model_path, "rb").read()


def _guard(digits, **sections) -> GuardedModel:
    sess, _, npz, meta, model_bytes = digits
    sections.setdefault("rate_limit", NO_LIMIT)
    sections.setdefault("extraction", NO_MONITOR)
    sections.setdefault("input", InputSchema(value_range=(0.0, 1.0)))
    gate = sections.get("anomaly")
    if gate is not None and gate.detector_meta is None:
        sections["anomaly"] = AnomalyGateConfig(action=gate.action, detector_meta=meta)
    cfg = GuardConfig(**sections)
    scorer = AnomalyScorer.from_bytes(npz, cfg.anomaly.detector_meta) if cfg.anomaly.action != "off" else None
    return GuardedModel(model_bytes if scorer is not None else sess, cfg, scorer)


# -- config ------------------------------------------------------------------------------------


def test_config_round_trips_through_canonical_json(digits):
    _, _, _, meta, _ = digits
    cfg = GuardConfig(
        input=InputSchema(sample_shape=(1, 8, 8), value_range=(0.0, 1.0), out_of_range="clip"),
        rate_limit=RateLimitConfig(per_client="10/second", global_limit="1000/minute"),
        anomaly=AnomalyGateConfig(action="flag", detector_meta=meta),
        output=OutputPolicyConfig(policy="adaptive_misinformation"),
        telemetry=TelemetryConfig(ood_edges=(0.0, 1.0), reference_ood_counts=(1, 2, 3), epsilon=1.0),
    )
    text = json.dumps(cfg.to_dict(), sort_keys=True, allow_nan=False)
    assert GuardConfig.from_dict(json.loads(text)) == cfg
    assert GuardConfig.from_dict({}) == GuardConfig()


@pytest.mark.parametrize(
    "runtime, path",
    [
        ({"inputs": {}}, "runtime"),
        ({"input": {"max_batch": True}}, "input.max_batch"),
        ({"input": {"value_range": [1, 0]}}, "input.value_range"),
        ({"input": {"dtype": "float64"}}, "input.dtype"),
        ({"rate_limit": {"per_client": "often"}}, "rate_limit.per_client"),
        ({"output": {"policy": "top_k", "k": 0}}, "output.k"),
        ({"extraction": {"delta": 1.5}}, "extraction.delta"),
        ({"extraction": {"min_queries": 600, "max_distances": 500}}, "extraction.min_queries"),
        ({"telemetry": {"reference_ood_counts": [1, 2]}}, "telemetry.reference_ood_counts"),
        ({"telemetry": {"epsilon": 0}}, "telemetry.epsilon"),
        ({"output": {"policy": "adaptive_misinformation"}}, "output.policy"),
        ([], "runtime"),
    ],
)
def test_bad_config_names_the_field(runtime, path):
    with pytest.raises(GuardConfigError) as ei:
        GuardConfig.from_dict(runtime)
    assert ei.value.path == path


def test_constructor_refuses_inconsistent_parts(digits):
    sess = digits[0]
    with pytest.raises(ValueError, match="AnomalyScorer"):
        GuardedModel(sess, GuardConfig(anomaly=AnomalyGateConfig(action="reject")))
    # detectors fitted for another model (30 tabular features) are caught at construction
    wrong = io.BytesIO()
    np.savez(wrong, knn__bank=np.zeros((5, 30)))
    meta = {
        "format": FORMAT, "threshold": 1.0, "fusion": {"rule": "mean_z", "members": ["knn"]},
        "detectors": [{"name": "knn", "kind": "input_knn", "view": "input", "norm": {"mean": 0, "std": 1}}],
    }
    with pytest.raises(ValueError, match="expected 30"):
        GuardedModel(digits[4], GuardConfig(anomaly=AnomalyGateConfig(action="flag")), AnomalyScorer.from_bytes(wrong.getvalue(), meta))
    with pytest.raises(ValueError, match="pass the model bytes"):  # the gate runs inside the guard's own session
        GuardedModel(sess, GuardConfig(anomaly=AnomalyGateConfig(action="flag")), AnomalyScorer.from_bytes(digits[2], digits[3]))
    guard = GuardedModel(sess, GuardConfig())
    for bad in ("", 7, None, "x" * 300):
        with pytest.raises(ValueError, match="client_id"):
            guard.predict(digits[1]["x"][:1], bad)


def test_model_bytes_go_through_admission(digits):
    from runtime_guard.errors import ModelRejected

    model_bytes = digits[4]
    guard = GuardedModel(model_bytes, GuardConfig(rate_limit=NO_LIMIT, extraction=NO_MONITOR))
    x = digits[1]["x"][:3]
    assert guard.predict(x, "c").logits.tobytes() == digits[0].run(None, {"input": x})[0].tobytes()
    with pytest.raises(ModelRejected):
        GuardedModel(model_bytes[:100], GuardConfig())


# -- anomaly gate --------------------------------------------------------------------------------


def test_gate_reject_refuses_ood_and_keeps_in_distribution(digits):
    _, data, *_ = digits
    guard = _guard(digits, anomaly=AnomalyGateConfig(action="reject"))
    ind = [guard.predict(x, "c") for x in data["x"]]
    ood = [guard.predict(x, "c") for x in data["ood_heldout"][:200]]
    noise = [guard.predict(x, "c") for x in np.random.default_rng(0).random((50, 1, 8, 8), dtype=np.float32)]
    acc_ind = np.mean([r.decision == "accepted" for r in ind])
    rej_ood = np.mean([r.decision == "rejected" for r in ood])
    rej_noise = np.mean([r.decision == "rejected" for r in noise])
    assert acc_ind >= 0.85, acc_ind  # ~95% by construction of the threshold
    assert rej_ood >= 0.8, rej_ood  # held-out digits 6-9 are near-OOD (~94% here)
    assert rej_noise == 1.0
    for r in ood + noise:
        if r.decision == "rejected":
            assert r.reasons == ["ood"] and r.labels is None and r.scores is None
            assert r.ood_scores[0] > guard.anomaly.threshold


def test_gate_flag_answers_but_marks(digits):
    sess, data, *_ = digits
    guard = _guard(digits, anomaly=AnomalyGateConfig(action="flag"))
    x = np.concatenate([data["x"][:5], np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)])
    r = guard.predict(x, "c")
    assert r.decision == "flagged" and r.reasons == ["ood"]
    np.testing.assert_array_equal(r.labels, sess.run(None, {"input": x})[0].argmax(1))
    assert guard.anomaly.is_anomalous(r.ood_scores)[5:].all()


def test_gate_reject_refuses_a_whole_batch_with_one_ood_row(digits):
    _, data, *_ = digits
    guard = _guard(digits, anomaly=AnomalyGateConfig(action="reject"))
    x = np.concatenate([data["x"][:4], np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)])
    r = guard.predict(x, "c")
    assert r.decision == "rejected" and r.ood_scores.shape == (5,)


# -- output policies through the guard -----------------------------------------------------------


@pytest.mark.parametrize("policy", OUTPUT_POLICIES)
def test_honest_inputs_keep_top1_under_every_policy(digits, policy):
    sess, data, *_ = digits
    gate = AnomalyGateConfig(action="flag") if policy == "adaptive_misinformation" else None
    guard = _guard(digits, output=OutputPolicyConfig(policy=policy, k=2), **({"anomaly": gate} if gate else {}))
    x = data["x"]
    raw = sess.run(None, {"input": x})[0]
    r = guard.predict(x[:64], "c")
    r2 = guard.predict(x[64:128], "c")
    labels = np.concatenate([r.labels, r2.labels])
    scores = np.concatenate([r.scores, r2.scores])
    if policy == "adaptive_misinformation":
        ood = np.concatenate([guard.anomaly.is_anomalous(r.ood_scores), guard.anomaly.is_anomalous(r2.ood_scores)])
        honest = ~ood
        assert honest.mean() > 0.85
        np.testing.assert_array_equal(scores[honest], softmax(raw[:128])[honest])
    else:
        honest = np.ones(128, bool)
    np.testing.assert_array_equal(labels[honest], raw[:128].argmax(1)[honest])
    if policy == "label_only":
        np.testing.assert_array_equal(scores, np.eye(6)[labels])


def test_misinformation_misleads_only_ood_inputs(digits):
    sess, data, *_ = digits
    guard = _guard(
        digits, anomaly=AnomalyGateConfig(action="flag"), output=OutputPolicyConfig(policy="adaptive_misinformation")
    )
    x = data["ood_heldout"][:64]
    raw = sess.run(None, {"input": x})[0].argmax(1)
    r = guard.predict(x, "c")
    ood = guard.anomaly.is_anomalous(r.ood_scores)
    assert ood.sum() >= 20
    assert (r.labels[ood] != raw[ood]).all()
    np.testing.assert_array_equal(r.labels[~ood], raw[~ood])
    assert r.logits.argmax(1).tolist() == raw.tolist()  # logits stay raw in-process
    assert "logits" not in r.to_dict()


# -- results, telemetry, bundle ------------------------------------------------------------------


def test_result_to_dict_is_json_and_has_no_raw_logits(digits):
    guard = _guard(digits, output=OutputPolicyConfig(policy="top_k", k=2))
    r = guard.predict(digits[1]["x"][:2].tolist(), "c")
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["decision"] == "accepted" and len(d["labels"]) == 2 and len(d["scores"][0]) == 6
    assert isinstance(r, PredictionResult) and r.ok and r.label == d["labels"][0] and r.latency_s > 0


def test_load_from_signed_bundle(digits, tmp_path):
    from runtime_guard.bundle import RollbackState, build_bundle, generate_kek, generate_signing_keypair
    from runtime_guard.errors import BundleError, RollbackError

    sess, data, npz, meta, model_bytes = digits
    cfg = GuardConfig(
        input=InputSchema(value_range=(0.0, 1.0)),
        anomaly=AnomalyGateConfig(action="reject", detector_meta=meta),
        output=OutputPolicyConfig(policy="rounded", decimals=3),
        rate_limit=RateLimitConfig(per_client="100/minute"),
    )
    priv, pub = generate_signing_keypair()
    kek = generate_kek()
    blob, _ = build_bundle(
        {"model": model_bytes, "detectors.npz": npz}, {"runtime": cfg.to_dict()}, priv, kek, version=3
    )
    state = RollbackState(tmp_path / "rollback.json")
    guard = GuardedModel.load(blob, pub, kek, rollback_state=state)
    assert guard.config == cfg and guard.manifest["version"] == 3
    assert state.highest_version == 3  # accepted after the smoke test
    x = data["x"][:10]
    r = guard.predict(x, "c")
    assert r.logits.tobytes() == sess.run(None, {"input": x})[0].tobytes()
    assert r.scores.tolist() == np.round(softmax(r.logits), 3).tolist()
    assert guard.predict(np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32), "c").decision == "rejected"

    older, _ = build_bundle({"model": model_bytes}, {"runtime": {}}, priv, kek, version=2)
    with pytest.raises(RollbackError):
        GuardedModel.load(older, pub, kek, rollback_state=state)
    tampered = bytearray(blob)
    tampered[-5] ^= 1
    with pytest.raises(BundleError):
        GuardedModel.load(bytes(tampered), pub, kek)
    bad_rt, _ = build_bundle({"model": model_bytes}, {"runtime": {"output": {"policy": "nope"}}}, priv, kek, version=4)
    with pytest.raises(GuardConfigError):
        GuardedModel.load(bad_rt, pub, kek)
    gated_without_detectors, _ = build_bundle(
        {"model": model_bytes}, {"runtime": {"anomaly": {"action": "flag"}}}, priv, kek, version=5
    )
    with pytest.raises(ValueError, match="detectors.npz"):
        GuardedModel.load(gated_without_detectors, pub, kek)


def test_non_finite_model_output_is_refused_not_answered():
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], [1e30] * 12)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        "overflow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    guard = GuardedModel(model.SerializeToString(), GuardConfig(rate_limit=NO_LIMIT, extraction=NO_MONITOR))
    assert guard.predict(np.full((1, 4), 0.5, np.float32), "c").decision == "accepted"
    res = guard.predict(np.full((1, 4), 1e10, np.float32), "c")
    assert res.decision == "rejected" and res.reasons == ["output:non_finite"] and res.scores is None
    assert res.verdict.refused_by is Stage.OUTPUT and res.to_dict()["reasons"] == ["output:non_finite"]
