"""Channels-last and QLinearSoftmax contrib ops in the graph converter (``attacks.onnx_torch``).

Hand-built int8 graphs in onnxruntime's com.microsoft contrib format, run by the real
onnxruntime session: the converted copy must match it, a quantised final softmax must be
recognised as probabilities and attacked on its logits, and channels-last ops the converter
cannot run are refused with their name in the audit's report.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from attacks.onnx_torch import ConversionError, convert, final_activation, verify
from attacks.outputs import OutputConvention
from hardening.robustness import run_robustness_audit

MS = "com.microsoft"


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _contrib_model(path, softmax_opset: int = 13, refused: str | None = None) -> str:
    """pixels [N,2,6,6] -> Quantize -> QLinearConv -> NHWC -> NhwcMaxPool -> channels-last
    QLinearGlobalAveragePool -> QLinearMatMul -> QLinearSoftmax -> Dequantize = probabilities.
    ``refused``: put that channels-last op in (a com.microsoft QLinearConv with channels_last)."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-60, 60, size=(4, 2, 3, 3)).astype(np.int8)
    w2 = rng.integers(-90, 90, size=(4, 3)).astype(np.int8)
    inits = [
        _init("s_in", np.float32(1 / 255)), _init("z_in", np.uint8(0)),
        _init("w1", w1), _init("s_w1", np.float32(0.01)), _init("z_w1", np.int8(0)),
        _init("s_c", np.float32(0.02)), _init("z_c", np.uint8(128)),
        _init("s_p", np.float32(0.02)), _init("z_p", np.uint8(128)),
        _init("w2", w2), _init("s_w2", np.float32(0.02)), _init("z_w2", np.int8(0)),
        _init("s_l", np.float32(0.05)), _init("z_l", np.uint8(128)),
        _init("s_o", np.float32(1 / 256)), _init("z_o", np.uint8(0)),
        _init("shape", np.array([-1, 4], dtype=np.int64)),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["pixels", "s_in", "z_in"], ["xq"])]
    if refused:
        nodes += [
            helper.make_node("Transpose", ["xq"], ["xq_nhwc"], perm=[0, 2, 3, 1]),
            helper.make_node("QLinearConv", ["xq_nhwc", "s_in", "z_in", "w1", "s_w1", "z_w1", "s_c", "z_c"], ["c_nhwc"],
                             domain=MS, pads=[1, 1, 1, 1], channels_last=1),
        ]
    else:
        nodes += [
            helper.make_node("QLinearConv", ["xq", "s_in", "z_in", "w1", "s_w1", "z_w1", "s_c", "z_c"], ["c"],
                             pads=[1, 1, 1, 1]),
            helper.make_node("Transpose", ["c"], ["c_nhwc"], perm=[0, 2, 3, 1]),
        ]
    nodes += [
        helper.make_node("NhwcMaxPool", ["c_nhwc"], ["m"], domain=MS, kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("QLinearGlobalAveragePool", ["m", "s_c", "z_c", "s_p", "z_p"], ["g"], domain=MS,
                         channels_last=1),
        helper.make_node("Reshape", ["g", "shape"], ["f"]),
        helper.make_node("QLinearMatMul", ["f", "s_p", "z_p", "w2", "s_w2", "z_w2", "s_l", "z_l"], ["lq"]),
        helper.make_node("QLinearSoftmax", ["lq", "s_l", "z_l", "s_o", "z_o"], ["pq"], domain=MS, axis=-1,
                         opset=softmax_opset),
        helper.make_node("DequantizeLinear", ["pq", "s_o", "z_o"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes, "contrib", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _x(n=256, seed=1):
    return np.random.default_rng(seed).random((n, 2, 6, 6), dtype=np.float32)


@pytest.mark.parametrize("softmax_opset", [11, 13])
def test_channels_last_pooling_and_qlinear_softmax_convert_and_match_the_session(tmp_path, softmax_opset):
    path = _contrib_model(tmp_path / "m.onnx", softmax_opset)
    model = onnx.load(path)
    assert final_activation(model, "probs") == "Softmax"
    conv = convert(model, "pixels", "probs")
    assert conv.activation_dropped == "Softmax"
    assert {"NhwcMaxPool", "QLinearGlobalAveragePool"} <= set(conv.op_types)
    assert "QLinearSoftmax" not in conv.op_types  # dropped: the copy returns its (dequantised) logits
    x = _x()
    probs = _session(path).run(None, {"pixels": x})[0]
    ver = verify(conv.module, OutputConvention.PROBABILITIES.to_logits(probs), x, OutputConvention.PROBABILITIES)
    assert ver.top1_agreement >= 0.95, ver
    with torch.no_grad():
        z = conv.module(torch.from_numpy(x)).numpy()
    # the copy's softmax, quantised as the graph does, is the session's output
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.abs(np.clip(np.round(p * 256), 0, 255) / 256 - probs).max() <= 1.5 / 256


def test_qlinear_softmax_kept_when_not_dropped_matches_the_session(tmp_path):
    path = _contrib_model(tmp_path / "m.onnx")
    conv = convert(onnx.load(path), "pixels", "probs", drop_activation=False)
    assert "QLinearSoftmax" in conv.non_differentiable
    x = _x(64)
    with torch.no_grad():
        ours = conv.module(torch.from_numpy(x)).numpy()
    assert np.abs(ours - _session(path).run(None, {"pixels": x})[0]).max() <= 1.5 / 256


def test_channels_last_qlinearconv_is_refused_by_name_and_the_report_says_so(tmp_path):
    path = _contrib_model(tmp_path / "r.onnx", refused="QLinearConv")
    with pytest.raises(ConversionError, match="channels-last.*QLinearConv"):
        convert(onnx.load(path), "pixels", "probs")
    x = _x(48)
    y = _session(path).run(None, {"pixels": x})[0].argmax(1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rep = run_robustness_audit([path], str(tmp_path / "d.npz"), eps=[0.05], n=24, attacks=["square"],
                               self_checks=False)
    v = rep.variants[0]
    assert "com.microsoft.QLinearConv" in v.gradient_check["graph"]["reason"]
    msg = next(f.message for f in rep.findings if f.code == "NO_GRADIENT_ROUTE")
    assert "channels-last" in msg and "QLinearConv" in msg
    assert v.upper_bound and v.output_convention == "probabilities"


def test_int8_softmax_model_is_audited_on_its_logits_through_its_own_graph(tmp_path):
    path = _contrib_model(tmp_path / "m.onnx")
    x = _x(96)
    y = _session(path).run(None, {"pixels": x})[0].argmax(1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rep = run_robustness_audit([path], str(tmp_path / "d.npz"), eps=[0.02, 0.2], n=48,
                               attacks=["fgsm", "pgd", "square"], self_checks=False)
    v = rep.variants[0]
    assert v.output_convention == "probabilities"
    assert {"family": "bpda", "gradients": "onnx-graph"} in v.gradient_routes or \
        {"family": "white-box", "gradients": "onnx-graph"} in v.gradient_routes
    assert any(f.code == "PROBABILITY_OUTPUT" and "Softmax input" in f.message for f in rep.findings)
    grad = sum(r.broken for r in v.attacks if r.family in ("white-box", "bpda"))
    assert grad > 0  # the gradient family breaks points through the straight-through copy
    assert v.robust_at(0.2).robust_accuracy < v.robust_at(0.02).robust_accuracy
