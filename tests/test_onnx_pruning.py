"""Pruning fits the source it has: a TorchScript harden cannot rebuild, or no source, prunes on
the ONNX graph at a sparsity chosen on held-out data, or is skipped with the reason."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hardening.compression import compress, load_variants, skipped_variants
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
def test_pruned_variants_without_a_trainable_source(digits_demo, script_source, tmp_path, source):
    """A TorchScript harden cannot rebuild, or no source: weights zeroed on the ONNX graph at
    the largest grid sparsity whose held-out accuracy is within the tolerance, the grid recorded."""
    src = script_source if source == "torchscript" else None
    vs = compress(digits_demo.model_path, digits_demo.data_path, tmp_path, torch_source=src,
                  kinds=("float", "pruned_unstructured", "pruned_structured"), sparsity=0.5, channel_ratio=0.5)
    by = {v.kind: v for v in vs}
    with np.load(digits_demo.data_path, allow_pickle=False) as z:
        x, y, x_cal, y_cal = z["x"], z["y"], z["x_cal"], z["y_cal"]
    info = load_model(by["float"].path)

    def acc(path, xs, ys):
        return float((make_session(path).run(None, {info.input_name: xs})[0].argmax(1) == ys).mean())

    for kind in ("pruned_unstructured", "pruned_structured"):
        r = by[kind].recipe
        assert r["tool"].startswith("edgeward.onnx_pruning.") and r["physically_smaller"] is False
        assert ("no PyTorch source" in r["why_onnx_level"]) == (src is None)
        if src is not None:
            assert "cannot be retrained" in r["why_onnx_level"]
        sel = r["selection"]
        assert sel["split"] == "x_cal" and [g["sparsity"] for g in sel["grid"]] == [0.125, 0.25, 0.375, 0.5]
        ok = [g["sparsity"] for g in sel["grid"] if g["drop"] <= sel["max_drop"]]
        assert r["target_sparsity"] == max(ok)  # the largest within tolerance
        assert sel["float_accuracy"] - acc(by[kind].path, x_cal, y_cal) <= 0.03 + 1e-9
        assert acc(by["float"].path, x, y) - acc(by[kind].path, x, y) <= 0.05  # and on the audit's split
        assert by[kind].torch_source == (str(src) if src else None)  # zeroed graph: the parent's source
        load_model(by[kind].path)  # passes intake
    ws = [w for w, _ in _weights(by["pruned_unstructured"].path).values()]
    zeros = sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws)
    s_u = by["pruned_unstructured"].recipe["target_sparsity"]
    assert abs(zeros - s_u) < 0.02 and abs(by["pruned_unstructured"].recipe["achieved_weight_sparsity"] - zeros) < 1e-9
    # structured: whole output channels of every layer but the head are zero
    s_s = by["pruned_structured"].recipe["target_sparsity"]
    ws = list(_weights(by["pruned_structured"].path).values())
    assert len(ws) >= 2
    for i, (w, axis) in enumerate(ws):
        per_out = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).sum(axis=1)
        dead = int((per_out == 0).sum())
        if i < len(ws) - 1:
            assert dead == round(s_s * w.shape[axis]), (i, dead, w.shape)
        else:
            assert dead == 0  # the classifier head keeps every class
    rows = json.loads((tmp_path / "variants.json").read_text())
    assert [r["name"] for r in rows] == ["float", "pruned_unstructured", "pruned_structured"]
    assert not list(tmp_path.glob("pruned_*.*.onnx"))  # the grid's candidates are cleaned up


def test_onnx_level_pruning_that_loses_too_much_is_skipped_with_its_reason(digits_demo, tmp_path):
    """No sparsity of the grid keeps the accuracy: the variant is not offered; variants.json
    says why and keeps what was measured."""
    # labels = the float model's own predictions: float is exact on x_cal, so any change is a drop
    arrays = dict(np.load(digits_demo.data_path, allow_pickle=False))
    info = load_model(digits_demo.model_path)
    arrays["y_cal"] = make_session(digits_demo.model_path).run(None, {info.input_name: arrays["x_cal"]})[0].argmax(1)
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    vs = compress(digits_demo.model_path, data, tmp_path, kinds=("float", "pruned_structured"), channel_ratio=0.95,
                  max_accuracy_drop=0.0)
    assert [v.kind for v in vs] == ["float"]
    assert not (tmp_path / "pruned_structured.onnx").exists() and not list(tmp_path.glob("pruned_*.onnx"))
    (row,) = skipped_variants(tmp_path / "variants.json")
    assert row["name"] == "pruned_structured" and row["path"] is None
    assert "no sparsity in" in row["skipped"] and "within 0 of float" in row["skipped"]
    grid = row["recipe"]["selection"]["grid"]
    assert len(grid) == 4 and all(g["drop"] > 0 for g in grid) and grid[-1]["sparsity"] == 0.95
    assert [v.kind for v in load_variants(tmp_path / "variants.json")] == ["float"]  # readers never see it
