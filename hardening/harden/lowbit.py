"""Low-bit weight-only variants: 4-bit blockwise weights through onnxruntime's MatMulNBits
(``onnxruntime.quantization.matmul_nbits_quantizer``). No retraining: the variant's PyTorch
source is its float parent's, like ``compress``'s int8 variants (the audit attacks it by
straight-through gradients of that parent and transfer, judged on the int4 session)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hardening.errors import InputError
from hardening.harden.base import Context

BLOCK_SIZE = 32


def _gemm_to_matmul(model) -> int:
    """Rewrite Gemm nodes with a constant weight (alpha = beta = 1, no transA) as MatMul (+ Add):
    the 4-bit quantizer only takes MatMul, and the torch exporter writes Linear as Gemm."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, rewritten = [], 0
    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if (n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and n.input[1] in inits and a.get("alpha", 1.0) == 1.0
                and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)):
            w = numpy_helper.to_array(inits[n.input[1]])
            w = w.T if a.get("transB", 0) else w
            name = n.input[1] + "_kn"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
            has_bias = len(n.input) > 2 and n.input[2]
            mm_out = n.output[0] + "_matmul" if has_bias else n.output[0]
            nodes.append(helper.make_node("MatMul", [n.input[0], name], [mm_out], name=(n.name or "gemm") + "_matmul"))
            if has_bias:
                nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=(n.name or "gemm") + "_bias"))
            rewritten += 1
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return rewritten


def int4(ctx: Context, float_onnx: Path, dst: Path) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    model = onnx.load(str(float_onnx))
    rewritten = _gemm_to_matmul(model)
    onnx.checker.check_model(model, full_check=True)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        cfg = mnb.DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=None)
        quantizer = mnb.MatMulNBitsQuantizer(model, algo_config=cfg)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), False)
    finally:
        log.setLevel(level)
    q = onnx.load(str(dst))
    n4 = sum(n.op_type == "MatMulNBits" for n in q.graph.node)
    if n4 == 0:
        raise InputError(f"int4: {float_onnx.name} has no MatMul/Gemm with constant weights to quantize")
    return {
        "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer (DefaultWeightOnlyQuantConfig)",
        "method": "4-bit weight-only, blockwise symmetric (RTN); activations and Conv layers stay float",
        "bits": 4, "block_size": BLOCK_SIZE, "symmetric": True, "op": "com.microsoft MatMulNBits",
        "gemm_rewritten_to_matmul": rewritten, "quantized_nodes": n4, "retrained": False, "seed": ctx.seed,
    }
