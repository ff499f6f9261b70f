"""Small ONNX models that pass admission and ``onnx.checker`` but are hostile or odd.

Each takes the digits demo's input (``input``, float32 ``[N, 1, 8, 8]``) so a
signed bundle with the demo's runtime policy reaches the guard constructor:

* ``loop_bomb``: a ``Loop`` of 10^9 iterations producing the logits (hangs a run);
* ``runtime_alloc_bomb``: ``ConstantOfShape`` of ``Shape(x) * [2^20, 2^14]``
  -> 4 TiB of float32 at run time (the shape is not a constant);
* ``static_alloc_bomb``: ``ConstantOfShape`` of a constant 2^40-element shape;
* ``scalar_output``: the only output is a scalar;
* ``features_only``: the only output is named ``features``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])


def _model(nodes, outputs, inits) -> bytes:
    g = helper.make_graph(nodes, "hostile", [INPUT], outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def _logits(name: str = "logits"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 6])


def loop_bomb(trips: int = 10**9) -> bytes:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(np.ones((1, 6), np.float32), "one")])
    return _model(
        [helper.make_node("ReduceSum", ["input"], ["s"], keepdims=0),
         helper.make_node("Mul", ["s", "zero"], ["s0"]),
         helper.make_node("Add", ["base", "s0"], ["acc0"]),
         helper.make_node("Loop", ["trips", "cond", "acc0"], ["logits"], body=body)],
        [_logits()],
        [numpy_helper.from_array(np.array(trips, np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "cond"),
         numpy_helper.from_array(np.array(0, np.float32), "zero"),
         numpy_helper.from_array(np.zeros((1, 6), np.float32), "base")])


def _alloc(shape_nodes, inits) -> bytes:
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    return _model(
        shape_nodes + [
            helper.make_node("ConstantOfShape", ["target"], ["huge"], value=one),
            helper.make_node("ReduceSum", ["huge"], ["t"], keepdims=0),
            helper.make_node("Mul", ["t", "zero"], ["t0"]),
            helper.make_node("Add", ["base", "t0"], ["logits"])],
        [_logits()],
        inits + [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                 numpy_helper.from_array(np.zeros((1, 6), np.float32), "base")])


def runtime_alloc_bomb() -> bytes:
    """Shape(input) = [1, 1, 8, 8] -> Slice to [1, 64] -> * [2^20, 2^14] = 2^40 elements."""
    return _alloc(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Shape", ["flat"], ["sh"]),
         helper.make_node("Mul", ["sh", "scale"], ["target"])],
        [numpy_helper.from_array(np.array([1 << 20, 1 << 14], np.int64), "scale")])


def static_alloc_bomb() -> bytes:
    return _alloc([], [numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "target")])


def _reduce_to(name: str, shape: list):
    return _model(
        [helper.make_node("ReduceSum", ["input"], [name], keepdims=0)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)], [])


def scalar_output() -> bytes:
    return _reduce_to("logits", [])


def features_only() -> bytes:
    return _model(
        [helper.make_node("Flatten", ["input"], ["features"], axis=1)],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64])], [])


HOSTILE = {  # name -> (builder, check the server must answer with)
    "loop": (loop_bomb, "deadline"),
    "runtime-alloc": (runtime_alloc_bomb, "smoke-run"),
    "static-alloc": (static_alloc_bomb, "static-size"),
    "scalar-output": (scalar_output, "outputs"),
    "features-only": (features_only, "outputs"),
}
