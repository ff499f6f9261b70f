"""``admission.load_session``: large weights reach onnxruntime as OrtValues that view
the (decrypted) model bytes, not as a second parsed copy.

Checked: outputs equal a plain session's for aligned and misaligned weights and
several element types; no copy on our side, aligned or not; onnxruntime owns its
copy once the session exists (the plaintext may be overwritten or freed); an
external-data entry is never resolved as a file; models
whose weights cannot be mapped, and models under
``AdmissionLimits.strip_min_model_bytes``, take the plain path; admission still
refuses what it refused before. The small models here take the in-place path
through ``strip_min_model_bytes=0``.
"""

from __future__ import annotations

import gc
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.admission import AdmissionLimits, _admit, _weights_in_place, load_session
from runtime_guard.errors import ModelRejected

D = 160  # 160*160*4 B = 100 KiB > checker_strip_bytes (64 KiB): W is stripped
STRIP = AdmissionLimits(strip_min_model_bytes=0)  # strip and load in place even these small models


def gemm(doc: str = "", dtype=np.float32, seed: int = 0) -> bytes:
    """x @ W + B with W big enough to be stripped; ``doc`` shifts W's byte offset."""
    rng = np.random.default_rng(seed)
    k = D * 4 // np.dtype(dtype).itemsize  # W is >= 100 KiB for every element type
    w = numpy_helper.from_array((rng.standard_normal((k, D)) * 3).astype(dtype), "W")
    b = numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "B")
    nodes = [helper.make_node("Gemm", ["x", "Wf", "B"], ["y"])]
    if dtype == np.float32:
        nodes[0].input[1] = "W"
    else:
        nodes.insert(0, helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, D])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)  # before the graph
    m.ir_version = 8
    return m.SerializeToString()


def plain_run(model: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def x_for(model: bytes) -> np.ndarray:
    k = onnx.load_from_string(model).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    return np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)


X = x_for(gemm())


@pytest.mark.parametrize("shift", range(4))  # W's raw_data lands on every offset mod 4
def test_outputs_equal_plain_session_aligned_or_not(shift):
    model = gemm(doc="d" * shift)
    admitted = _admit(model, STRIP)
    (offset, length), = admitted.stripped.values()
    assert _weights_in_place(admitted) is not None  # the in-place path is taken
    sess = load_session(model, STRIP)
    np.testing.assert_array_equal(sess.run(None, {"x": X})[0], plain_run(model, X))
    assert length == D * D * 4 and model[offset:offset + 16] == np.asarray(
        numpy_helper.to_array(onnx.load_from_string(model).graph.initializer[0])).tobytes()[:16]


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int8, np.int32])
def test_other_element_types(dtype):
    model = gemm(dtype=dtype)
    assert _weights_in_place(_admit(model, STRIP)) is not None
    sess = load_session(model, STRIP)
    x = x_for(model)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], plain_run(model, x))


@pytest.mark.parametrize("shift", range(4))
def test_weights_are_views_not_copies_aligned_or_not(shift):
    admitted = _admit(gemm(doc="d" * shift), STRIP)
    (offset, _), = admitted.stripped.values()
    assert len({_admit(gemm(doc="d" * k), STRIP).stripped[0][0] % 4 for k in range(4)}) == 4
    _, names, values = _weights_in_place(admitted)
    base = np.frombuffer(admitted.model_bytes, np.uint8).ctypes.data
    assert names == ["W"] and values[0].data_ptr() == base + offset


@pytest.mark.parametrize("shift", range(4))
def test_the_session_owns_its_weights_once_loaded(shift):
    """onnxruntime copies external initializers while the session loads, so the
    plaintext can be overwritten (here) or freed (GuardedModel.load) right after."""
    model = gemm(seed=3)
    want = plain_run(model, X)
    buf = bytearray(shift) + bytearray(model)  # a writable plaintext at every alignment
    admitted = _admit(model, STRIP)
    (offset, length), = admitted.stripped.values()
    skeleton, names, _ = _weights_in_place(admitted)
    arr = np.frombuffer(buf, "<f4", count=length // 4, offset=offset + shift).reshape(D, D)
    assert arr.flags.aligned == (shift == (-offset) % 4)
    so = ort.SessionOptions()
    so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(arr)])
    sess = ort.InferenceSession(skeleton, so, providers=["CPUExecutionProvider"])
    np.frombuffer(buf, np.uint8)[:] = 0x7F  # the plaintext is gone
    del buf, arr, so
    gc.collect()
    np.frombuffer(os.urandom(D * D * 8), np.uint8).copy()  # churn the allocator
    np.testing.assert_array_equal(sess.run(None, {"x": X})[0], want)


def test_external_entries_never_resolve_to_files(tmp_path, monkeypatch):
    """The skeleton's external-data location is empty: without the supplied values
    onnxruntime refuses it instead of reading a file, whatever sits in the cwd."""
    model = gemm()
    skeleton, names, _ = _weights_in_place(_admit(model, STRIP))
    m = onnx.load_from_string(skeleton)
    ext = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert [t.name for t in ext] == names == ["W"]
    assert [(e.key, e.value) for e in ext[0].external_data] == [("location", "")]
    monkeypatch.chdir(tmp_path)
    for fname in ("W", "model.onnx", "edgeward-memory"):
        (tmp_path / fname).write_bytes(b"\0" * (D * D * 4))
    with pytest.raises(Exception, match="[Ee]xternal"):
        ort.InferenceSession(skeleton, providers=["CPUExecutionProvider"])


def test_unmappable_weights_fall_back_to_plain_bytes():
    # a large bfloat16 weight is stripped for the checker, but numpy has no such dtype
    w = helper.make_tensor("S", TensorProto.BFLOAT16, [40000], b"\x80\x3f" * 40000, raw=True)
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    model = m.SerializeToString()
    admitted = _admit(model, STRIP)
    assert list(admitted.stripped) == [0] and _weights_in_place(admitted) is None
    sess = load_session(model, STRIP)
    x = np.ones((1, 2), np.float32)
    assert np.array_equal(sess.run(None, {"x": x})[0], x)


def test_small_weights_go_as_plain_bytes_large_ones_in_place():
    small = gemm()
    assert not _admit(small, AdmissionLimits()).stripped  # checked whole, plain bytes
    d = 736  # 736*736*4 B = 2.07 MiB, just over the default strip_min_model_bytes
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((d, d)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    large = m.SerializeToString()
    assert len(large) >= AdmissionLimits().strip_min_model_bytes
    assert _weights_in_place(_admit(large, AdmissionLimits())) is not None
    sess = load_session(large)
    x = x_for(large)
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], plain_run(large, x))


def test_admission_still_refuses_before_any_session():
    m = onnx.load_from_string(gemm())
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="weights.bin")
    with pytest.raises(ModelRejected) as e:
        load_session(m.SerializeToString())
    assert e.value.check == "external-data"
