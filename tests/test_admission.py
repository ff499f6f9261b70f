"""Admission checks refuse dangerous ONNX features; a clean model passes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.admission import AdmissionLimits, admit_model, open_session, session_options
from runtime_guard.errors import BundleError, ModelRejected

X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])


def weights() -> list[onnx.TensorProto]:
    rng = np.random.default_rng(0)
    return [numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal((3,)).astype(np.float32), "B")]


def model(nodes=None, inits=None, opsets=(("", 17),), ir=8, **kw) -> onnx.ModelProto:
    nodes = nodes or [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
                      helper.make_node("Softmax", ["z"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "g", [X], [Y], weights() if inits is None else inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], **kw)
    m.ir_version = ir
    return m


def rejected(data: bytes, check: str, limits: AdmissionLimits | None = None) -> ModelRejected:
    with pytest.raises(ModelRejected) as ei:
        admit_model(data, limits or AdmissionLimits())
    assert isinstance(ei.value, BundleError)
    assert ei.value.check == check, f"{ei.value.check}: {ei.value}"
    assert ei.value.reason in str(ei.value)
    return ei.value


def test_good_model_passes_and_runs():
    data = model().SerializeToString()
    parsed = admit_model(data, AdmissionLimits())
    assert parsed.graph.node[0].op_type == "Gemm"
    sess = open_session(data)
    out = sess.run(None, {"x": np.ones((2, 4), np.float32)})[0]
    assert out.shape == (2, 3) and np.allclose(out.sum(axis=1), 1.0)
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_session_options_locked_down():
    so = session_options(1, 1)
    assert so.enable_profiling is False
    assert so.optimized_model_filepath == ""
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.load_model_format") == "ONNX"
    assert so.get_session_config_entry("session.use_env_allocators") == "0"
    for bad in (0, -1, 1000, True):
        with pytest.raises(ValueError):
            session_options(bad, 1)


def test_session_writes_nothing_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open_session(model().SerializeToString()).run(None, {"x": np.ones((1, 4), np.float32)})
    assert os.listdir(tmp_path) == []


def test_external_data_initializer():
    m = model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="weights.bin")
    assert "external data" in rejected(m.SerializeToString(), "external-data").reason


def test_external_data_entry_without_location_flag():
    m = model()
    m.graph.initializer[1].external_data.add(key="location", value="/etc/passwd")
    rejected(m.SerializeToString(), "external-data")


def test_external_data_in_subgraph_constant():
    ext = numpy_helper.from_array(np.ones((1,), np.float32), "c")
    ext.ClearField("raw_data")
    ext.data_location = TensorProto.EXTERNAL
    ext.external_data.add(key="location", value="../../secret")
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c_out"], value=ext)], "then", [],
        [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [1])])
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["e_out"], value=numpy_helper.from_array(np.zeros(1, np.float32)))],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    g = helper.make_graph(nodes, "g", [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [cond])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    rejected(m.SerializeToString(), "external-data")


def test_ort_mem_addr_marker_anywhere():
    m = model()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="*/_ORT_MEM_ADDR_/*")
    t.external_data.add(key="offset", value=str(0x7FFF0000))
    rejected(m.SerializeToString(), "ort-mem-addr")
    m2 = model(doc_string="hello _ORT_MEM_ADDR_ world")  # only in a string field
    rejected(m2.SerializeToString(), "ort-mem-addr")


def test_custom_domain_op():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
             helper.make_node("EvilOp", ["z"], ["y"], domain="com.evil")]
    m = model(nodes=nodes, opsets=(("", 17), ("com.evil", 1)))
    rejected(m.SerializeToString(), "op-domain")
    # node in a custom domain without an opset import for it
    m2 = model(nodes=nodes)
    rejected(m2.SerializeToString(), "op-domain")


def test_com_microsoft_op_allowed():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
             helper.make_node("Gelu", ["z"], ["y"], domain="com.microsoft")]
    data = model(nodes=nodes, opsets=(("", 17), ("com.microsoft", 1))).SerializeToString()
    admit_model(data)
    assert open_session(data).run(None, {"x": np.ones((1, 4), np.float32)})[0].shape == (1, 3)


@pytest.mark.parametrize("opset", [11, 12, 24])
def test_opset_out_of_range(opset):
    rejected(model(opsets=(("", opset),)).SerializeToString(), "opset")


def test_missing_default_opset():
    rejected(model(opsets=(("ai.onnx.ml", 3),)).SerializeToString(), "opset")


def test_oversize():
    data = model().SerializeToString()
    rejected(data, "size", AdmissionLimits(max_model_bytes=len(data) - 1))
    admit_model(data, AdmissionLimits(max_model_bytes=len(data)))


def test_node_count_cap():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z0"])]
    nodes += [helper.make_node("Relu", [f"z{i}"], [f"z{i + 1}"]) for i in range(50)]
    nodes += [helper.make_node("Softmax", ["z50"], ["y"], axis=1)]
    data = model(nodes=nodes).SerializeToString()
    admit_model(data)
    rejected(data, "node-count", AdmissionLimits(max_nodes=20))


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 64, b"not an onnx model at all" * 10,
                                     np.random.default_rng(3).bytes(4096)])
def test_garbage_bytes(garbage):
    with pytest.raises(ModelRejected) as ei:
        admit_model(garbage)
    assert ei.value.check in {"parse", "ir-version"}


def test_checker_failure_is_rejected():
    bad_w = [numpy_helper.from_array(np.ones((5, 3), np.float32), "W"),
             numpy_helper.from_array(np.ones((3,), np.float32), "B")]
    m = model(inits=bad_w)  # Gemm K mismatch -> strict shape inference fails
    rejected(m.SerializeToString(), "checker")
    m2 = model()
    m2.graph.node[1].input[0] = "undefined_tensor"  # dangling input
    rejected(m2.SerializeToString(), "checker")


def test_local_functions_rejected():
    m = model()
    fn = helper.make_function("local.fn", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    rejected(m.SerializeToString(), "functions")


def test_ir_version_out_of_range():
    rejected(model(ir=3).SerializeToString(), "ir-version")


def test_open_session_rejects_unloadable_bytes():
    with pytest.raises(ModelRejected):
        open_session(b"\x08\x08garbage")


# --- large initializers: checks run on a weight-stripped copy ------------------

def big_model(k: int = 4, n: int = 5000) -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "Wbig")  # 80 KB
    shape = numpy_helper.from_array(np.array([-1, n], np.int64), "shape")  # small: kept
    nodes = [helper.make_node("MatMul", ["x", "Wbig"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["y"])]
    g = helper.make_graph(nodes, "big", [X], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [w, shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


STRIP = AdmissionLimits(strip_min_model_bytes=0)  # treat these 80 KB models as large


def test_large_model_passes_and_full_proto_choice():
    m = big_model()
    data = m.SerializeToString()
    full = admit_model(data, STRIP)
    assert full == m  # full parse returned by default
    assert admit_model(data) == m  # under strip_min_model_bytes: checked whole
    light = admit_model(data, STRIP, full_proto=False)
    assert light.graph.initializer[0].raw_data == b""  # weights not copied
    assert light.graph.initializer[1] == m.graph.initializer[1]  # small ones kept
    assert [n.op_type for n in light.graph.node] == ["MatMul", "Reshape"]
    out = open_session(data).run(None, {"x": np.ones((2, 4), np.float32)})[0]
    assert out.shape == (2, 5000)


def test_large_model_shape_error_still_caught():
    m = big_model(k=5)  # x is [N, 4] but W is [5, N]: MatMul mismatch
    rejected(m.SerializeToString(), "checker", STRIP)
    rejected(m.SerializeToString(), "checker")


def test_large_initializer_with_wrong_data_size():
    m = big_model()
    m.graph.initializer[0].dims[1] = 4999  # raw_data now longer than dims imply
    rejected(m.SerializeToString(), "tensor-data", STRIP)
    rejected(m.SerializeToString(), "tensor-data")  # checked whole: same check
    small = big_model(n=50)  # a 800-byte initializer is never stripped
    small.graph.initializer[0].dims[1] = 49
    rejected(small.SerializeToString(), "tensor-data", STRIP)
    m2 = big_model()
    m2.graph.initializer[0].float_data.append(1.0)  # two value fields
    rejected(m2.SerializeToString(), "tensor-data", STRIP)
    rejected(m2.SerializeToString(), "checker")  # checked whole: onnx.checker refuses it


def test_wire_oddities_rejected():
    data = big_model().SerializeToString()
    # a second graph field (protobuf would merge it; the wire walk refuses it)
    g = big_model().graph.SerializeToString()
    from runtime_guard.admission import _len_field
    rejected(data + _len_field(7, g), "parse", STRIP)
    rejected(data + _len_field(7, g), "duplicate-initializer")  # checked whole: merged, then refused
    for bad in (data + b"\x0b", data[:-3]):  # group wire type; truncated field
        rejected(bad, "parse", STRIP)
        rejected(bad, "parse")
