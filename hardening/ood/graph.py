"""Expose penultimate features from an ONNX model that only outputs logits.

A graph edit adds an existing intermediate tensor as an extra graph output.
Without a user-named tensor we pick the data input of the classifier head that
produces the logits (``find_penultimate``). We then run both models with
onnxruntime and refuse the edit if any logit changed or the tensor is not float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, shape_inference

from hardening.errors import ModelError
from hardening.intake import make_session

# Ops the walk back from the logits steps through: elementwise with constants, shape-only
# ops, output activations, and the (de)quantization around int8 layers.
_PASS_THROUGH = {"Add", "Sub", "Mul", "Div", "Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast",
                 "Softmax", "LogSoftmax", "Sigmoid", "DequantizeLinear", "QuantizeLinear",
                 "GlobalAveragePool", "GlobalMaxPool", "ReduceMean"}
# The classifier head: its data input is the penultimate tensor. Conv covers 1x1 conv heads.
_HEADS = {"Gemm", "MatMul", "Conv", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm"}
# Producers of a quantized copy of a float tensor: features are read at the float side.
_QUANTIZERS = {"QuantizeLinear", "DynamicQuantizeLinear"}


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors that do not depend on the input: initializers, Constant nodes, and anything
    computed only from those (e.g. DequantizeLinear of int8 weights, a transposed weight)."""
    const = {i.name for i in graph.initializer}
    for node in graph.node:  # nodes are topologically sorted
        if node.op_type == "Constant" or (node.input and all(not i or i in const for i in node.input)):
            const.update(node.output)
    return const


@dataclass(frozen=True)
class FeatureEdit:
    model_bytes: bytes
    features_output: str
    tensor: str  # the intermediate tensor now exposed
    chosen_by: str  # "user" or "final_linear"
    max_logit_diff: float


def find_penultimate(model: onnx.ModelProto, logits_output: str) -> str:
    """Data input of the classifier head feeding ``logits_output``: the last Gemm, MatMul,
    1x1 Conv (or their int8 forms) reached by walking back through biases, scales, reshapes,
    pooling, output activations and (de)quantization; for an int8 head, the float tensor
    before its quantizer."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    const = _constants(graph)

    def search(name: str, depth: int) -> str | None:
        node = producer.get(name)
        if node is None or depth == 0:
            return None
        data = [i for i in node.input if i and i not in const]
        if node.op_type in _HEADS and data:
            tensor = node.input[0] if node.input[0] not in const else data[0]
            q = producer.get(tensor)
            while q is not None and q.op_type in _QUANTIZERS and q.input[0] not in const:
                tensor = q.input[0]
                q = producer.get(tensor)
            return tensor
        if node.op_type not in _PASS_THROUGH:
            return None
        # a dynamic int8 head rescales by a data-dependent factor: try each operand
        return next((t for t in (search(i, depth - 1) for i in data) if t is not None), None)

    found = search(logits_output, 32)
    if found is not None:
        return found
    raise ModelError(
        f"cannot find the classifier head (Gemm, MatMul or 1x1 Conv, possibly int8) feeding output "
        f"'{logits_output}'; name the feature tensor explicitly (--features-tensor)"
    )


def add_feature_output(
    model_bytes: bytes,
    input_name: str,
    logits_output: str,
    check_inputs: np.ndarray,
    tensor: str | None = None,
    output_name: str = "features",
) -> FeatureEdit:
    """Return the model with ``tensor`` (or the auto-picked penultimate tensor) as an output named ``output_name``."""
    model = onnx.load_from_string(model_bytes)
    chosen_by = "user" if tensor else "final_linear"
    tensor = tensor or find_penultimate(model, logits_output)
    produced = {o for n in model.graph.node for o in n.output}
    if tensor not in produced:
        raise ModelError(f"tensor '{tensor}' is not produced by any node of the model")
    if any(o.name == output_name for o in model.graph.output):
        raise ModelError(f"model already has an output named '{output_name}'")
    inferred = shape_inference.infer_shapes(model)
    vi = next((v for v in inferred.graph.value_info if v.name == tensor), None)
    out = onnx.ValueInfoProto()
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        out.CopyFrom(vi)
        out.name = output_name
    else:  # unknown shape: declare [batch, dim] symbolically; checked by running below
        out = helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, ["batch", "dim"])
    if tensor != output_name:
        model.graph.node.append(helper.make_node("Identity", [tensor], [output_name], name="edgeward_features"))
    model.graph.output.append(out)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"graph edit produced an invalid model: {str(e).splitlines()[0]}") from None
    edited = model.SerializeToString()

    before = make_session(model_bytes).run([logits_output], {input_name: check_inputs})[0]
    after_logits, feats = make_session(edited).run([logits_output, output_name], {input_name: check_inputs})
    diff = float(np.max(np.abs(before - after_logits))) if before.size else 0.0
    if diff != 0.0:
        raise ModelError(f"adding feature output changed logits (max abs diff {diff:g}); edit refused")
    if feats.ndim < 2 or feats.shape[0] != check_inputs.shape[0]:
        raise ModelError(f"tensor '{tensor}' has shape {feats.shape}; it must be per-sample [batch, ...]")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ModelError(f"tensor '{tensor}' is {feats.dtype}, not float; name a float feature tensor")
    return FeatureEdit(edited, output_name, tensor, chosen_by, diff)
