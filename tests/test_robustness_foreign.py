"""The audit stays honest on models edgeward did not build (issue 14).

Each model is trained and exported here (tests/foreign_models.py). The assertion that
matters: the audit's robust accuracy at L-inf eps is **no higher** than an independent
reference attack (margin-loss PGD through the test's own straight-through copy, judged on
the onnxruntime session) + 0.01; for ONNX-only float models, within 0.01 of the figure
the audit gives with the PyTorch source. Small n, fixed seeds; every fixture builds its
own generator, so test order does not matter.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hardening.report.checks import evaluate_policy
from hardening.report.policy import Policy
from hardening.report.summary import add_robustness, empty_variant
from hardening.robustness import run_robustness_audit

from foreign_models import CNN3, MLP, Deployed, ResidualCNN, cnn_data, export, mlp_data, quantize, reference_pgd, train

EPS = [0.05, 0.1, 0.2]
N = 40
SLACK = 0.01


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign_mlp")
    x, y = mlp_data()
    np.savez(d / "data.npz", x=x, y=y)
    model = train(MLP(), x, y)
    return d, x, y, model, export(model, x, d / "mlp.onnx", "sensor_readings", "scores")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("foreign_cnn")
    x, y = cnn_data()
    np.savez(d / "data.npz", x=x, y=y)
    model = train(CNN3(), x, y)
    return d, x, y, model, export(model, x, d / "cnn.onnx", "image", "out")


def _audit(path, data, source=None, eps=EPS, n=N, **kw):
    rep = run_robustness_audit([str(path)], str(data), torch_source=source, eps=eps, n=n, seed=0, **kw)
    return rep, rep.variants[0]


def _points(x, y, n=N):
    pick = np.sort(np.random.default_rng(0).choice(len(x), size=n, replace=False))  # the audit's own sample
    return x[pick], y[pick]


def _assert_not_above_reference(v, path, input_name, st_model, x, y, from_session=False, eps=EPS):
    xs, ys = _points(x, y, v.eps[0].n)
    dep = Deployed(path, input_name)
    for e, res in zip(eps, v.eps):
        ref = reference_pgd(dep, st_model, xs, ys, e, forward_from_session=from_session)
        assert res.robust_accuracy <= ref + SLACK, (v.name, e, res.robust_accuracy, ref)


def test_graph_copy_matches_the_session_on_every_foreign_graph(mlp, cnn):
    from attacks.estimators import OrtLogits
    from attacks.onnx_torch import convert, verify
    from attacks.outputs import OutputConvention
    from hardening.intake import load_model, make_session

    for _d, x, _y, _model, path in (mlp, cnn):
        variants = {"float": path, "static": quantize(path, x[:160], load_model(path).input_name, "static")}
        for kind, p in variants.items():
            info = load_model(p)
            conv = convert(onnx.load(str(p)), info.input_name, info.logits_output)
            ort_fn = OrtLogits(make_session(p), info.input_name, info.logits_output, x.shape[1:])
            ver = verify(conv.module, ort_fn(x[:64]), x[:64], OutputConvention.LOGITS)
            assert ver.exact, (p, ver)
            assert ("QuantizeLinear" in conv.non_differentiable) == (kind == "static")


def test_onnx_only_mlp_matches_the_source_figure_and_the_reference(mlp):
    d, x, y, model, path = mlp
    _, with_src = _audit(path, d / "data.npz", source=model)
    rep, alone = _audit(path, d / "data.npz")
    assert alone.gradient_routes == [{"family": "white-box", "gradients": "onnx-graph"}]
    assert alone.gradient_check["graph"]["status"] == "exact" and not alone.upper_bound
    for a, b in zip(alone.eps, with_src.eps):
        assert abs(a.robust_accuracy - b.robust_accuracy) <= SLACK, (a, b)
    _assert_not_above_reference(alone, path, "sensor_readings", model, x, y)
    assert "GRAPH_GRADIENTS" in {f.code for f in rep.findings}


def test_int8_static_cnn_without_source_gets_bpda_from_its_graph(cnn):
    d, x, y, model, path = cnn
    q = quantize(path, x[:160], "image", "static")
    rep, v = _audit(q, d / "data.npz")
    assert v.families[0] == "bpda" and {"family": "bpda", "gradients": "onnx-graph"} in v.gradient_routes
    assert "QuantizeLinear" in v.gradient_check["graph"]["non_differentiable"] and not v.upper_bound
    _assert_not_above_reference(v, q, "image", model, x, y, from_session=True)


def test_int8_qoperator_cnn_without_source_gets_bpda_from_its_graph(cnn):
    d, x, y, model, path = cnn
    q = quantize(path, x[:160], "image", "qoperator-per-channel")  # QLinearConv + com.microsoft.QGemm
    rep, v = _audit(q, d / "data.npz")
    graph = v.gradient_check["graph"]
    assert {"QLinearConv", "QGemm"} <= set(graph["non_differentiable"]) and graph["status"] == "straight-through"
    assert v.families[0] == "bpda" and not v.upper_bound
    _assert_not_above_reference(v, q, "image", model, x, y, from_session=True)


@pytest.fixture(scope="module")
def residual_int8(cnn, tmp_path_factory):
    """A ResNet-style CNN in onnxruntime's QOperator int8 format (QLinearAdd, pooling contrib ops)."""
    d, x, y, _model, _path = cnn
    model = train(ResidualCNN(), x, y)
    path = export(model, x, tmp_path_factory.mktemp("residual") / "res.onnx", "image", "out")
    m = onnx.load(str(path))
    for n in m.graph.node:  # torch's exporter writes ReduceMean; most exported ResNets have GlobalAveragePool
        if n.op_type == "ReduceMean":
            n.op_type = "GlobalAveragePool"
            del n.input[1:]
            del n.attribute[:]
    onnx.save(m, str(path))
    q = quantize(path, x[:160], "image", "qoperator")
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool"} <= ops, ops  # what ORT emits
    return d, x, y, model, q


def test_int8_qoperator_contrib_ops_convert_and_match_the_session(residual_int8):
    from attacks.estimators import OrtLogits
    from hardening.intake import make_session
    from hardening.robustness.routes import GraphStatus, graph_route

    d, x, y, model, q = residual_int8
    ort_fn = OrtLogits(make_session(q), "image", "out", x.shape[1:])
    graph = graph_route(str(q), "image", "out", ort_fn, x[:64])
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QLinearAveragePool"} <= set(graph.non_differentiable)
    assert graph.status in (GraphStatus.STRAIGHT_THROUGH, GraphStatus.APPROXIMATE), graph.reason
    assert graph.verification["top1_agreement"] >= 0.95, graph.verification


@pytest.mark.slow
def test_int8_qoperator_residual_cnn_gets_bpda_through_its_contrib_ops(residual_int8):
    d, x, y, model, q = residual_int8
    rep, v = _audit(q, d / "data.npz", profile="thorough")  # quick over-reports one point of 40 at eps 0.05
    assert v.families[0] == "bpda" and not v.upper_bound, v.upper_bound_reason
    _assert_not_above_reference(v, q, "image", model, x, y, from_session=True)


def test_input_rounding_with_a_torchscript_source_really_runs_bpda(mlp, tmp_path):
    d, x, y, model, _ = mlp
    rounding = copy.deepcopy(model)
    rounding.levels = 4
    path = export(rounding, x, tmp_path / "round.onnx", "sensor_readings", "scores")
    ts = tmp_path / "round.pt"
    torch.jit.trace(rounding, torch.from_numpy(x[:4])).save(str(ts))  # TorchScript bypasses torch modes
    rep, v = _audit(path, d / "data.npz", source=str(ts))
    msg = next(f.message for f in rep.findings if f.code == "ZERO_GRADIENTS")
    assert v.gradient_check["restored_by"] == "onnx-graph" and "restored by straight-through" in msg
    assert v.families[:2] == ["white-box", "bpda"] and not v.upper_bound
    ran = sum(r.attacked for r in v.attacks if r.family == "bpda")
    assert ran > 0 and f"{ran} point-attacks ran" in next(f.message for f in rep.findings if f.code == "STRAIGHT_THROUGH")
    st = copy.deepcopy(rounding)
    st.straight_through = True
    _assert_not_above_reference(v, path, "sensor_readings", st, x, y)


def test_softmax_output_with_source_is_attacked_on_log_probabilities(mlp, tmp_path):
    d, x, y, model, _ = mlp
    sm = copy.deepcopy(model)
    sm.softmax, sm.scale = True, 20.0  # saturating probabilities
    path = export(sm, x, tmp_path / "softmax.onnx", "sensor_readings", "probs")
    rep, v = _audit(path, d / "data.npz", source=sm)  # used to crash inside ART
    assert v.output_convention == "probabilities" and v.gradient_check["graph"]["activation_dropped"] == "Softmax"
    assert "PROBABILITY_OUTPUT" in {f.code for f in rep.findings} and not v.upper_bound
    _assert_not_above_reference(v, path, "sensor_readings", sm, x, y)


@pytest.mark.parametrize("with_source", [False, True])
def test_sigmoid_output_is_attacked_on_its_logit(mlp, tmp_path, with_source):
    d, x, y, model, _ = mlp
    sg = copy.deepcopy(model)
    sg.sigmoid, sg.scale = True, 20.0  # per-class probabilities, most of them saturated at 0 or 1
    path = export(sg, x, tmp_path / "sigmoid.onnx", "sensor_readings", "probs")
    rep, v = _audit(path, d / "data.npz", source=sg if with_source else None)
    graph = v.gradient_check["graph"]
    assert v.output_convention == "sigmoid" and graph["activation_dropped"] == "Sigmoid"
    assert graph["status"] == "exact" and not v.upper_bound, graph
    assert "Sigmoid probabilities" in next(f.message for f in rep.findings if f.code == "PROBABILITY_OUTPUT")
    _assert_not_above_reference(v, path, "sensor_readings", sg, x, y)


def test_sigmoid_logits_round_trip_where_float32_carries_them():
    from attacks.outputs import OutputConvention

    z = np.array([[-40.0, -10.0, 0.0, 3.0, 14.0, 40.0]], np.float32)
    back = OutputConvention.SIGMOID.to_logits((1 / (1 + np.exp(-z.astype(np.float64)))).astype(np.float32))
    keep = OutputConvention.SIGMOID.comparable(back)
    assert keep.tolist() == [[False, False, True, True, False, False]]
    assert np.allclose(back[keep], z[keep], atol=1e-3)
    assert np.all(np.diff(back[0]) >= 0)  # order kept where saturated


def test_logits_scaled_by_1000_do_not_blind_the_white_box_family(mlp, tmp_path):
    d, x, y, model, _ = mlp
    big = copy.deepcopy(model)
    big.scale = 1000.0
    path = export(big, x, tmp_path / "x1000.onnx", "sensor_readings", "scores")
    rep, v = _audit(path, d / "data.npz", source=big)
    assert v.gradient_check["logit_scale"] < 0.1 and "LOGITS_RESCALED" in {f.code for f in rep.findings}
    _assert_not_above_reference(v, path, "sensor_readings", big, x, y)


def _einsum_mlp(model: MLP, path):
    """The MLP with its first layer as Einsum: valid ONNX that the graph converter refuses."""
    w = [p.detach().numpy() for p in model.net.parameters()]
    inits = [numpy_helper.from_array(a.T.copy() if a.ndim == 2 else a, f"p{i}") for i, a in enumerate(w)]
    nodes = [helper.make_node("Einsum", ["inp", "p0"], ["h0"], equation="nd,dh->nh"),
             helper.make_node("Add", ["h0", "p1"], ["h1"]), helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("Gemm", ["h2", "p2", "p3"], ["h3"]), helper.make_node("Relu", ["h3"], ["h4"]),
             helper.make_node("Gemm", ["h4", "p4", "p5"], ["logits"])]
    g = helper.make_graph(nodes, "einsum_mlp", [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [None, 20])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_no_gradient_route_is_an_upper_bound_and_fails_the_policy(mlp, tmp_path):
    d, x, y, model, _ = mlp
    path = _einsum_mlp(model, tmp_path / "einsum.onnx")
    rep, v = _audit(path, d / "data.npz", eps=[0.1], n=16, attacks=["fgsm", "square"], self_checks=False)
    assert v.role == "black-box" and v.upper_bound and "Einsum" in v.gradient_check["graph"]["reason"]
    assert "NO_GRADIENT_ROUTE" in {f.code for f in rep.findings}
    summary = {"variants": {v.name: empty_variant("float")}, "reference_clean_accuracy": None}
    add_robustness(summary["variants"], json.loads(json.dumps(rep.to_dict())))
    pol = Policy()
    pol.robustness.min_robust_accuracy[1].min = 0.0  # even a zero threshold cannot pass an upper bound
    checks = [c for c in evaluate_policy(summary, pol, {"robustness": True}) if c.id.endswith("robust_accuracy@0.1")]
    assert checks and checks[0].status == "fail" and "upper bound" in checks[0].message


def test_attack_failures_inside_libraries_are_one_line_model_errors():
    from attacks.estimators import torch_classifier
    from attacks.evasion import craft
    from hardening.errors import ModelError

    class Breaks(torch.nn.Module):
        def forward(self, x):
            if x.requires_grad:
                raise RuntimeError("backward is not implemented for this layer\nsecond line")
            return x[:, :3] * 1.0

    est = torch_classifier(Breaks(), (5,), 3, (0.0, 1.0))
    x = np.random.default_rng(0).random((4, 5), dtype=np.float32)
    with pytest.raises(ModelError, match="attack 'pgd' failed") as e:
        craft("pgd", est, x, np.zeros(4, np.int64), 0.1, np.inf, {"max_iter": 2}, 0)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", ["float-src", "float-onnx", "static", "dynamic", "static-src", "dynamic-src",
                                     "qoperator", "qoperator-per-channel", "round4", "round16-onnx"])
def test_matrix_not_above_reference(which, variant, mlp, cnn, tmp_path):
    d, x, y, model, path = mlp if which == "mlp" else cnn
    name = "sensor_readings" if which == "mlp" else "image"
    src, st, from_session = None, model, False
    if variant.startswith("float"):
        src = model if variant == "float-src" else None
    elif variant.startswith(("static", "dynamic", "qoperator")):
        path = quantize(path, x[:160], name, variant.removesuffix("-src"))
        src, from_session = (model if variant.endswith("-src") else None), True
    else:
        levels = int(variant[5:].split("-")[0])
        r = copy.deepcopy(model)
        r.levels = levels
        path = export(r, x, tmp_path / "r.onnx", name, "out")
        st = copy.deepcopy(r)
        st.straight_through = True
        if not variant.endswith("-onnx"):
            src = tmp_path / "r.pt"
            torch.jit.trace(r, torch.from_numpy(x[:4])).save(str(src))
    _, v = _audit(path, d / "data.npz", source=src, n=60)
    assert not v.upper_bound, v.upper_bound_reason
    _assert_not_above_reference(v, path, name, st, x, y, from_session=from_session)


@pytest.mark.slow
@pytest.mark.parametrize("scale, softmax", [(100.0, False), (1000.0, False), (1.0, True), (50.0, True)])
@pytest.mark.parametrize("with_source", [True, False])
def test_masked_outputs_not_above_reference(scale, softmax, with_source, mlp, tmp_path):
    d, x, y, model, _ = mlp
    m = copy.deepcopy(model)
    m.scale, m.softmax = scale, softmax
    path = export(m, x, tmp_path / "m.onnx", "sensor_readings", "probs" if softmax else "scores")
    _, v = _audit(path, d / "data.npz", source=m if with_source else None, n=60)
    assert v.output_convention == ("probabilities" if softmax else "logits") and not v.upper_bound
    _assert_not_above_reference(v, path, "sensor_readings", m, x, y)


def test_cli_softmax_model_with_torchscript_source_exits_0_and_states_the_convention(mlp, tmp_path):
    from typer.testing import CliRunner

    from hardening.cli import app

    d, x, y, model, _ = mlp
    sm = copy.deepcopy(model)
    sm.softmax, sm.scale = True, 20.0
    path = export(sm, x, tmp_path / "softmax.onnx", "sensor_readings", "probs")
    ts = tmp_path / "softmax.pt"
    torch.jit.trace(sm, torch.from_numpy(x[:4])).save(str(ts))
    res = CliRunner().invoke(app, ["audit", "robustness", str(path), "--data", str(d / "data.npz"), "--torch-source",
                                   str(ts), "--n", "16", "--eps", "0.1", "--json", "--no-self-checks"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    v = json.loads(res.stdout)["variants"][0]
    assert v["output_convention"] == "probabilities" and v["upper_bound"] is False
    assert {"family": "white-box", "gradients": "onnx-graph"} in v["gradient_routes"]


def test_loss_cross_check_flags_a_blind_cross_entropy():
    from hardening.robustness.checks import check_losses
    from hardening.robustness.results import AttackRun, EpsResult, VariantResult

    eps = [EpsResult(0.1, 40, 100, 0.4, 0, 1, {"white-box": 0.4})]
    runs = [AttackRun("fgsm", "white-box", 0.1, 95, 0, 0, 0, 0.0), AttackRun("pgd", "white-box", 0.1, 95, 0, 0, 0, 0.0),
            AttackRun("apgd-dlr", "white-box", 0.1, 95, 55, 0, 0, 0.0)]
    v = VariantResult("m", "", "float", "white-box", ["white-box"], 0.95, None, eps, runs, [], None, False)
    found = check_losses(v)
    assert [f.code for f in found] == ["CE_LOSS_BLIND"] and "apgd-dlr broke 55 points" in found[0].message
    runs[2].broken = 1  # DLR adding a single point is noise, not a blind loss
    assert check_losses(v) == []


def test_input_binarisation_through_where_gets_straight_through_gradients(mlp, tmp_path):
    d, x, y, model, _ = mlp
    b = copy.deepcopy(model)
    b.threshold = 0.5
    path = export(b, x, tmp_path / "binarised.onnx", "sensor_readings", "scores")
    rep, v = _audit(path, d / "data.npz")
    graph = v.gradient_check["graph"]
    assert {"Greater", "Where"} <= set(graph["op_types"]) and "Greater" in graph["non_differentiable"]
    assert v.families[0] == "bpda" and not v.upper_bound
    st = copy.deepcopy(b)
    st.straight_through = True
    _assert_not_above_reference(v, path, "sensor_readings", st, x, y)
    # with the source, whose output has no gradient path to the input at all: flagged, not a crash
    rep, v = _audit(path, d / "data.npz", source=b)
    assert v.gradient_check["restored_by"] == "onnx-graph" and "ZERO_GRADIENTS" in {f.code for f in rep.findings}
    _assert_not_above_reference(v, path, "sensor_readings", st, x, y)


def test_a_graph_copy_that_does_not_match_the_session_is_not_used(mlp, cnn, tmp_path):
    from attacks.estimators import OrtLogits
    from attacks.onnx_torch import ConversionError, convert
    from hardening.intake import make_session
    from hardening.robustness.routes import GraphStatus, graph_route

    d, x, y, model, path = mlp
    other = train(MLP(), x, y, seed=5)  # same architecture, other weights: a session the graph is not
    other_path = export(other, x, tmp_path / "other.onnx", "sensor_readings", "scores")
    ort_fn = OrtLogits(make_session(other_path), "sensor_readings", "scores", x.shape[1:])
    route = graph_route(str(path), "sensor_readings", "scores", ort_fn, x[:64])
    assert route.status in (GraphStatus.MISMATCH, GraphStatus.APPROXIMATE) and "differs from onnxruntime" in route.reason
    assert route.status == GraphStatus.MISMATCH or route.verification["top1_agreement"] >= 0.9
    nms = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["b", "s"], ["i"])], "det",
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("i", TensorProto.INT64, [None, 3])])
    with pytest.raises(ConversionError, match="NonMaxSuppression"):
        convert(helper.make_model(nms), "b", "i")
