"""Cold-start work on admission: the ``_ORT_MEM_ADDR_`` scan covers the
weight-stripped skeleton only, and still refuses the marker everywhere it can
mean something (external_data locations, names, strings, attributes, small
initializers, subgraphs), on models whose large weights *are* stripped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.admission import ORT_MEM_ADDR_MARKER, AdmissionLimits, admit_model, open_session
from runtime_guard.errors import ModelRejected

MARK = ORT_MEM_ADDR_MARKER.decode()
D = 160  # 160*160*4 B = 100 KiB > checker_strip_bytes (64 KiB): W is stripped
LIMITS = AdmissionLimits(strip_min_model_bytes=0)  # strip even these 100 KiB models


def big_w(name: str = "W", fill: bytes | None = None) -> onnx.TensorProto:
    arr = np.random.default_rng(0).standard_normal((D, D)).astype(np.float32)
    t = numpy_helper.from_array(arr, name)
    if fill is not None:  # marker inside the weight bytes
        raw = bytearray(t.raw_data)
        raw[1000:1000 + len(fill)] = fill
        t.raw_data = bytes(raw)
    return t


def model(w: onnx.TensorProto | None = None, extra_inits=(), nodes=None, **kw) -> onnx.ModelProto:
    w = w if w is not None else big_w()
    b = numpy_helper.from_array(np.zeros(D, np.float32), "B")
    nodes = nodes or [helper.make_node("Gemm", ["x", w.name, "B"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, D])],
                          [w, b, *extra_inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], **kw)
    m.ir_version = 8
    return m


def refused(m: onnx.ModelProto, check: str = "ort-mem-addr") -> None:
    with pytest.raises(ModelRejected) as ei:
        admit_model(m.SerializeToString(), LIMITS, full_proto=False)
    assert ei.value.check == check, f"{ei.value.check}: {ei.value}"


def test_clean_model_weights_are_stripped():
    data = model().SerializeToString()
    assert len(data) > LIMITS.checker_strip_bytes
    admit_model(data, LIMITS, full_proto=False)


def test_marker_in_external_data_location_of_a_large_tensor():
    m = model()
    t = m.graph.initializer[0]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=f"*/{MARK}/*")
    t.external_data.add(key="offset", value=str(0x7FFF0000))
    refused(m)  # raw_data stripped, external_data entries are not


def test_marker_in_external_data_location_without_raw_data():
    m = model()
    t = m.graph.initializer[1]  # B
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=f"*/{MARK}/*")
    refused(m)


def test_marker_in_large_initializer_name():
    refused(model(w=big_w(name=f"W{MARK}")))


def test_marker_in_small_string_tensor_and_small_initializer_bytes():
    s = helper.make_tensor("S", TensorProto.STRING, [1], [ORT_MEM_ADDR_MARKER])
    refused(model(extra_inits=[s]))
    small = numpy_helper.from_array(np.frombuffer(ORT_MEM_ADDR_MARKER + b"\0\0", np.uint8), "U")
    refused(model(extra_inits=[small]))  # under the strip threshold: scanned


def test_marker_in_node_attribute_string_and_doc_strings():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
             helper.make_node("Softmax", ["z"], ["y"], axis=1, doc_string=MARK)]
    refused(model(nodes=nodes))
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
             helper.make_node("Cast", ["z"], ["y"], to=TensorProto.FLOAT),
             ]
    nodes[1].attribute.append(helper.make_attribute("note", MARK))
    refused(model(nodes=nodes))
    refused(model(doc_string=f"hello {MARK}"))
    m = model()
    m.metadata_props.add(key="k", value=MARK)
    refused(m)


def test_marker_in_subgraph_attribute_tensor():
    const = helper.make_node("Constant", [], ["c"], value=helper.make_tensor(
        "c", TensorProto.STRING, [1], [ORT_MEM_ADDR_MARKER]))
    branch = helper.make_graph([const, helper.make_node("Identity", ["z"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, D])])
    other = helper.make_graph([helper.make_node("Identity", ["z"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, D])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    refused(model(nodes=nodes, extra_inits=[cond]))


def test_marker_only_inside_stripped_weight_bytes_is_inert():
    """Weight bytes are tensor data, never a location string: admitted, and
    onnxruntime loads and runs the model normally."""
    data = model(w=big_w(fill=ORT_MEM_ADDR_MARKER)).SerializeToString()
    assert ORT_MEM_ADDR_MARKER in data
    admit_model(data, LIMITS, full_proto=False)
    out = open_session(data).run(None, {"x": np.ones((1, D), np.float32)})[0]
    assert out.shape == (1, D)


def test_small_models_are_scanned_whole():
    """Under strip_min_model_bytes nothing is stripped, so even weight bytes are scanned."""
    data = model(w=big_w(fill=ORT_MEM_ADDR_MARKER)).SerializeToString()
    assert len(data) < AdmissionLimits().strip_min_model_bytes
    with pytest.raises(ModelRejected) as ei:
        admit_model(data, AdmissionLimits())
    assert ei.value.check == "ort-mem-addr"


def test_marker_in_weight_bytes_with_external_data_still_refused():
    m = model(w=big_w(fill=ORT_MEM_ADDR_MARKER))
    t = m.graph.initializer[0]
    t.external_data.add(key="location", value="weights.bin")
    refused(m, check="external-data")
