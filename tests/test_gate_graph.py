"""The gate's one scoring path: the declared program as an onnxruntime graph.

The formulas themselves are checked against independent numpy in ``test_gate_budget``;
here: the graph the device builds is a valid ONNX model whose raw and fused outputs are the
program's, and a scorer used before a fork scores the same in the child (onnxruntime
sessions do not survive a fork, so each process makes its own).
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
