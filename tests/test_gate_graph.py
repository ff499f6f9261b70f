"""The gate's one scoring path: the declared program as an onnxruntime graph.

The formulas themselves are checked against independent numpy in ``test_gate_budget``;
here: the graph the device builds is a valid ONNX model whose raw and fused outputs are the
program's, a scorer used before a fork scores the same in the child (onnxruntime
sessions do not survive a fork, so each process makes its own), and the gate appended to a
model edgeward did not build (its own names, opsets 13 to 21, every input view, every load
path) scores as the standalone gate while the model's outputs stay the model's, bit for bit.
"""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import onnx
import pytest

from runtime_guard.anomaly import FUSION_RULES
from runtime_guard.gate_graph import GateGraph
from tests.test_gate_budget import _data, _scorer


@pytest.mark.parametrize("rule", FUSION_RULES)
def test_the_graph_is_valid_onnx_and_its_fused_output_is_the_fusion_of_its_raw_output(rule):
    sc, _ = _scorer(3, k=2, rule=rule)
    x, lg, ft = _data(4)
    for prog in (sc._program, sc._all):  # fused members, every detector
        onnx.checker.check_model(onnx.load_from_string(GateGraph(prog, prog.fusion).model_bytes), full_check=True)
    fused = sc.score(x, lg, ft)
    assert fused.shape == (len(x),) and fused.dtype == np.float64
    np.testing.assert_allclose(fused, sc.fuse(sc.scores_by_detector(x, lg, ft)), rtol=1e-9, atol=1e-9)




def test_a_scorer_used_before_a_fork_scores_the_same_in_the_child():
    sc, _ = _scorer(3)
    x, lg, ft = _data(5)
    before = sc.score(x, lg, ft)  # the parent's session exists now
    ctx = mp.get_context("fork")  # the device's platforms (Linux) all fork
    parent, child = ctx.Pipe()

    def run(conn):
        conn.send(sc.score(x, lg, ft))  # the inherited scorer: a new session in this process

    p = ctx.Process(target=run, args=(child,))
    p.start()
    try:
        got = parent.recv() if parent.poll(60) else None
    finally:
        p.join(60)
    assert got is not None and p.exitcode == 0
    np.testing.assert_array_equal(got, before)


# -- the gate inside the user's model: one onnxruntime session per guard ----------------------

SHAPE, D_F, C = (2, 6, 6), 12, 4
VIEWS = {  # input_view spec -> width
    "flatten": ({"kind": "flatten", "shape": list(SHAPE)}, 72),
    "avgpool_equal_bins": ({"kind": "avgpool", "shape": list(SHAPE), "out": [3, 3]}, 18),
    "avgpool_adaptive_bins": ({"kind": "avgpool", "shape": list(SHAPE), "out": [4, 4]}, 32),
    "projection": ({"kind": "projection", "shape": list(SHAPE)}, 10),
}


def _net(opset: int, hidden: int = 16, image_features: bool = False) -> bytes:
    """Not an edgeward model: input 'pixels' (batch, 2, 6, 6), outputs 'class_scores' and
    'features' ((batch, 12), or (batch, 12, 1, 1) as a pooled conv head gives), at ``opset``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(opset)
    ws = {"w0": rng.standard_normal((72, hidden)) / 8, "w1": rng.standard_normal((hidden, D_F)) / 4,
          "w2": rng.standard_normal((D_F, C))}
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w0"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]), helper.make_node("MatMul", ["hr", "w1"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["class_scores"])]
    if image_features:
        ws["axes"] = np.array([2, 3])
        nodes.append(helper.make_node("Unsqueeze", ["f", "axes"], ["features"]))
    else:
        nodes.append(helper.make_node("Identity", ["f"], ["features"]))
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info("class_scores", TensorProto.FLOAT, ["batch", C]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", D_F] + [1, 1] * image_features)],
        [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k) for k, v in ws.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def _gate(view: str, seed: int = 0, d_f: int = D_F, shape: tuple[int, ...] = SHAPE):
    import io

    from runtime_guard.anomaly import FORMAT, AnomalyScorer

    spec, width = VIEWS[view]
    if shape != SHAPE:  # fitted for inputs of another shape
        spec, width = {"kind": "flatten", "shape": list(shape)}, int(np.prod(shape))
    rng = np.random.default_rng(seed)
    arrays = {"maha__factor": rng.standard_normal((d_f, 5)), "maha__centers": rng.standard_normal((C, 5)),
              "knn__bank": rng.standard_normal((9, d_f)), "iknn__bank": rng.random((11, width)),
              "pca__mean": rng.random(width), "pca__components": np.linalg.qr(rng.standard_normal((width, 3)))[0].T}
    if view == "projection":
        arrays["input_view__matrix"] = rng.standard_normal((72, width)) / 8
    buf = io.BytesIO()
    np.savez(buf, **{a: v.astype(np.float32) for a, v in arrays.items()})
    dets = [
        {"name": "energy", "kind": "energy", "view": "logits", "norm": {"mean": -2.0, "std": 1.0}},
        {"name": "maha", "kind": "mahalanobis", "view": "features", "norm": {"mean": 10.0, "std": 5.0}},
        {"name": "knn", "kind": "knn", "view": "features", "params": {"n_neighbors": 2}, "norm": {"mean": 1.0, "std": 0.3}},
        {"name": "iknn", "kind": "input_knn", "view": "input", "norm": {"mean": 1.0, "std": 0.5}},
        {"name": "pca", "kind": "pca", "view": "input", "norm": {"mean": 1.0, "std": 0.5}},
    ]
    meta = {"format": FORMAT, "threshold": 1.0, "input_view": {**spec, "width": width},
            "fusion": {"rule": "mean_pos_z", "members": [d["name"] for d in dets]}, "detectors": dets}
    return AnomalyScorer.from_bytes(buf.getvalue(), meta)


def _guard(model_bytes: bytes, scorer, **kw):
    from runtime_guard.config import AnomalyGateConfig, ExtractionMonitorConfig, GuardConfig, RateLimitConfig
    from runtime_guard.guard import GuardedModel

    cfg = GuardConfig(anomaly=AnomalyGateConfig(action="flag", detector_meta=scorer.meta),
                      rate_limit=RateLimitConfig(per_client=None), extraction=ExtractionMonitorConfig(enabled=False))
    return GuardedModel(model_bytes, cfg, scorer, **kw)


def _bare(model_bytes: bytes, x: np.ndarray) -> list[np.ndarray]:
    from runtime_guard.admission import load_session

    return load_session(model_bytes).run(["class_scores", "features"], {"pixels": x})


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("view", list(VIEWS))
def test_the_gate_inside_the_model_scores_as_the_standalone_gate_and_leaves_the_logits_alone(opset, view):
    model, scorer = _net(opset), _gate(view)
    x = np.random.default_rng(1).random((7, *SHAPE), dtype=np.float32)
    guard = _guard(model, scorer)
    assert [o.name for o in guard.session.get_outputs()][-2:] == ["edgeward_gate/scores", "edgeward_gate/check"]
    assert (guard.input_name, guard.logits_name, guard.features_name) == ("pixels", "class_scores", "features")
    logits, feats = _bare(model, x)
    for n in (1, 7):  # one request of a sample, one of a batch
        r = guard.predict(x[:n], "c")
        assert r.logits.tobytes() == logits[:n].tobytes()  # the model's part is the model, bit for bit
        np.testing.assert_allclose(r.ood_scores, scorer.score(x[:n], logits[:n], feats[:n]), rtol=1e-5, atol=1e-6)
    # a view the sanitizer does not see overflowing (features of huge, valid-range-free inputs) is refused
    with pytest.raises(ValueError, match="NaN/Inf"):
        guard.predict(np.full((1, *SHAPE), 3e37, np.float32), "c")


def test_pooled_conv_features_are_read_flat():
    model, scorer = _net(18, image_features=True), _gate("avgpool_equal_bins")
    x = np.random.default_rng(3).random((4, *SHAPE), dtype=np.float32)
    logits, feats = _bare(model, x)
    assert feats.shape == (4, D_F, 1, 1)
    np.testing.assert_allclose(_guard(model, scorer).predict(x, "c").ood_scores, scorer.score(x, logits, feats),
                               rtol=1e-5, atol=1e-6)


def test_every_load_path_carries_the_gate(tmp_path):
    """Bytes under the in-memory threshold, weights handed over in place, a bundle streamed
    through a pipe: the gate is the same part of the model on each path."""
    from runtime_guard.admission import AdmissionLimits
    from runtime_guard.bundle import build_bundle, generate_kek, generate_signing_keypair
    from runtime_guard.guard import GuardedModel

    model, scorer = _net(18, hidden=1024), _gate("avgpool_equal_bins")  # w0: 288 KiB, a stripped weight
    x = np.random.default_rng(2).random((5, *SHAPE), dtype=np.float32)
    want = _guard(model, scorer).predict(x, "c").ood_scores
    small = AdmissionLimits(strip_min_model_bytes=1)  # every model takes the large-model paths
    np.testing.assert_array_equal(_guard(model, scorer, admission_limits=small).predict(x, "c").ood_scores, want)
    priv, pub = generate_signing_keypair()
    kek = generate_kek()
    cfg = _guard(model, scorer).config
    blob, _ = build_bundle({"model": model, "detectors.npz": scorer.npz_bytes}, {"runtime": cfg.to_dict()}, priv, kek,
                           version=1)
    streamed = GuardedModel.load(blob, pub, kek, admission_limits=small)
    np.testing.assert_array_equal(streamed.predict(x, "c").ood_scores, want)
    np.testing.assert_array_equal(GuardedModel.load(blob, pub, kek).predict(x, "c").ood_scores, want)


def test_detectors_for_other_widths_are_refused_before_any_session():
    from runtime_guard.errors import PartsMismatch

    with pytest.raises(PartsMismatch, match="features has 12 values per sample, expected 13"):
        _guard(_net(18), _gate("flatten", d_f=13))
    with pytest.raises(PartsMismatch, match="input has 72 values per sample, the detectors were fitted on 50"):
        _guard(_net(18), _gate("flatten", shape=(50,)))
