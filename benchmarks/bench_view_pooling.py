"""The compact input view's average pooling as onnxruntime nodes: ``AveragePool`` against the
two small products ``rows @ x @ cols^T`` the gate uses (``runtime_guard/gate_graph.py``).

Each formulation is a one-input graph at batch 1, same inputs, alternated in rounds; prints
the p50 of ``session.run`` per formulation and round (µs).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_view_pooling.py --shape 3,96,96 --out 8,8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.gate_graph import pool_matrix


def _session(nodes: list, inits: dict[str, np.ndarray], shape: tuple[int, ...]) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, *shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="3,96,96", help="C,H,W")
    ap.add_argument("--out", default="8,8", help="pooled h,w (equal bins: H % h == W % w == 0)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("-n", type=int, default=4000, help="timed runs per formulation and round")
    args = ap.parse_args()
    c, h, w = (int(v) for v in args.shape.split(","))
    oh, ow = (int(v) for v in args.out.split(","))
    assert h % oh == 0 and w % ow == 0, "AveragePool needs equal bins"
    flat = helper.make_node("Flatten", ["p"], ["y"], axis=1)
    cases = {
        "AveragePool": _session([helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[h // oh, w // ow],
                                                  strides=[h // oh, w // ow]), flat], {}, (c, h, w)),
        "rows @ x @ cols^T": _session(
            [helper.make_node("MatMul", ["x", "cols"], ["a"]), helper.make_node("MatMul", ["rows", "a"], ["p"]), flat],
            {"cols": pool_matrix(w, ow).T.astype(np.float32), "rows": pool_matrix(h, oh).astype(np.float32)}, (c, h, w)),
    }
    xs = [np.random.default_rng(i).random((1, c, h, w), dtype=np.float32) for i in range(50)]
    ref = cases["AveragePool"].run(None, {"x": xs[0]})[0]
    for s in cases.values():
        np.testing.assert_allclose(s.run(None, {"x": xs[0]})[0], ref, rtol=1e-5, atol=1e-6)
    for r in range(args.rounds):
        for name, s in cases.items():
            ts = []
            for i in range(args.n):
                x = xs[i % len(xs)]
                t0 = time.perf_counter_ns()
                s.run(None, {"x": x})
                ts.append(time.perf_counter_ns() - t0)
            print(f"round {r + 1} | {name} | p50 {np.median(ts) / 1e3:.1f} us")


if __name__ == "__main__":
    main()
