"""Pruning fits the source it has: TorchScript and no source prune on the ONNX graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hardening.compression import compress
from hardening.intake import load_model, make_session


def _weights(path):
    """{name: (array, output axis)} per ONNX semantics: Conv W[O,I,...]; Gemm B[I,O] (B[O,I]
    with transB); MatMul B[I,O]. In graph order."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        trans_b = any(a.name == "transB" and a.i for a in n.attribute)
        axis = 0 if n.op_type == "Conv" or trans_b else 1
        out[n.input[1]] = (inits[n.input[1]], axis)
    return out


@pytest.fixture(scope="module")
def script_source(digits_demo, tmp_path_factory):
    from hardening.torch_source import load_torch_source

    model = load_torch_source(digits_demo.torch_path)
    path = tmp_path_factory.mktemp("ts") / "model.ts.pt"
    with np.load(digits_demo.data_path, allow_pickle=False) as z:
        sample = torch.from_numpy(z["x"][:2])
    torch.jit.trace(model, sample).save(str(path))
    return path


@pytest.mark.parametrize("source", ["torchscript", "none"])
def test_pruned_variants_without_a_prunable_source(digits_demo, script_source, tmp_path, source):
    src = script_source if source == "torchscript" else None
    vs = compress(digits_demo.model_path, digits_demo.data_path, tmp_path, torch_source=src,
                  kinds=("float", "pruned_unstructured", "pruned_structured"), sparsity=0.5)
    by = {v.kind: v for v in vs}
    for kind in ("pruned_unstructured", "pruned_structured"):
        r = by[kind].recipe
        assert r["tool"].startswith("edgeward.onnx_pruning.")
        assert ("no PyTorch source" in r["why_onnx_level"]) == (src is None)
        load_model(by[kind].path)  # passes intake
    ws = [w for w, _ in _weights(by["pruned_unstructured"].path).values()]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)
    assert abs(zeros - 0.5) < 0.02 and abs(by["pruned_unstructured"].recipe["achieved_weight_sparsity"] - zeros) < 1e-9
    # structured: whole output channels of every layer but the head are zero
    ws = list(_weights(by["pruned_structured"].path).values())
    assert len(ws) >= 2
    for i, (w, axis) in enumerate(ws):
        per_out = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).sum(axis=1)
        dead = int((per_out == 0).sum())
        if i < len(ws) - 1:
            assert dead == round(0.5 * w.shape[axis]), (i, dead, w.shape)
        else:
            assert dead == 0  # the classifier head keeps every class
    # the pruned model still runs and mostly agrees with the float model
    with np.load(digits_demo.data_path, allow_pickle=False) as z:
        x = z["x"]
    info = load_model(by["float"].path)
    f = make_session(by["float"].path).run(None, {info.input_name: x})[0].argmax(1)
    p = make_session(by["pruned_unstructured"].path).run(None, {info.input_name: x})[0].argmax(1)
    assert np.mean(f == p) > 0.5
