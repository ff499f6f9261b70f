"""Magnitude pruning on the ONNX graph itself, for models without a PyTorch source that
``edgeward harden`` can train (other TorchScript, other frameworks, or none).

Two recipes on the weight initializers of Conv, Gemm and MatMul nodes: global L1
unstructured (the smallest |w| across all layers set to zero), or L2 structured (whole
output channels / neurons of every layer but the classifier head, which keeps all its
classes). Nothing is fine-tuned and nothing is removed: the file keeps its size and dense
kernels their latency, so ``hardening.compression`` picks the sparsity on held-out data
(the largest of a small grid within the accuracy tolerance) or skips the variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hardening.errors import ModelError


@dataclass
class _Weight:
    name: str
    out_axis: int  # axis that indexes output channels / neurons


def _weights(graph) -> list[_Weight]:  # type: ignore[no-untyped-def]
    """Prunable weight initializers, in graph (topological) order, each once."""
    inits = {i.name: i for i in graph.initializer}
    found: dict[str, _Weight] = {}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name, dims = node.input[1], list(inits[node.input[1]].dims)
        if node.op_type == "Conv" and len(dims) >= 3:
            axis = 0
        elif node.op_type == "Gemm" and len(dims) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        elif node.op_type == "MatMul" and len(dims) == 2:
            axis = 1
        else:
            continue
        found.setdefault(name, _Weight(name, axis))
    return list(found.values())


def prune_onnx(src: str | Path, dst: str | Path, sparsity: float, structured: bool) -> dict:
    """Write the pruned model to ``dst``; returns the recipe facts (achieved sparsity, layers)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = _weights(graph)
    if not weights:
        raise ModelError(f"{src}: no Conv/Gemm/MatMul weight initializers to prune")
    inits = {i.name: i for i in graph.initializer}
    arrays = {w.name: numpy_helper.to_array(inits[w.name]).copy() for w in weights}
    if structured:
        pruned = weights[:-1]  # the classifier head keeps every class
        for w in pruned:
            a = arrays[w.name]
            moved = np.moveaxis(a, w.out_axis, 0)
            norms = np.sqrt((moved.reshape(moved.shape[0], -1) ** 2).sum(axis=1))
            drop = np.argsort(norms, kind="stable")[: int(round(sparsity * moved.shape[0]))]
            moved[drop] = 0  # a view: writes through to ``a``
    else:
        pruned = weights
        flat = np.concatenate([np.abs(arrays[w.name]).ravel() for w in weights])
        k = int(round(sparsity * flat.size))
        if k:
            cut = np.partition(flat, k - 1)[k - 1]
            for w in weights:
                a = arrays[w.name]
                a[np.abs(a) <= cut] = 0
    for w in weights:
        inits[w.name].CopyFrom(numpy_helper.from_array(arrays[w.name], w.name))
    onnx.save(model, str(dst))
    total = sum(a.size for a in arrays.values())
    zeros = sum(int((a == 0).sum()) for a in arrays.values())
    return {
        "tool": "edgeward.onnx_pruning." + ("l2_structured(output channels)" if structured else "global_l1_unstructured"),
        "target_sparsity": sparsity,
        "achieved_weight_sparsity": zeros / total,
        "layers": len(pruned),
    }
