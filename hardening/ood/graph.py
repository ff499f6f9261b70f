"""Expose penultimate features from an ONNX model that only outputs logits.

A graph edit adds an existing intermediate tensor as an extra graph output.
Without a user-named tensor we pick the data input of the Gemm/MatMul that
(possibly through an Add bias) produces the logits. We then run both models
with onnxruntime and refuse the edit if any logit changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, shape_inference

from hardening.errors import ModelError
from hardening.intake import make_session

_PASS_THROUGH = {"Add", "Identity", "Flatten", "Reshape", "Squeeze", "Cast"}


@dataclass(frozen=True)
class FeatureEdit:
    model_bytes: bytes
    features_output: str
    tensor: str  # the intermediate tensor now exposed
    chosen_by: str  # "user" or "final_linear"
    max_logit_diff: float


def find_penultimate(model: onnx.ModelProto, logits_output: str) -> str:
    """Input tensor of the final Gemm/MatMul feeding ``logits_output``."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    name = logits_output
    for _ in range(8):  # walk back through bias adds / reshapes only
        node = producer.get(name)
        if node is None:
            break
        if node.op_type in ("Gemm", "MatMul"):
            data = [i for i in node.input[:2] if i not in inits]
            if len(data) == 1:
                return data[0]
            break
        if node.op_type not in _PASS_THROUGH:
            break
        data = [i for i in node.input if i and i not in inits]
        if len(data) != 1:
            break
        name = data[0]
    raise ModelError(
        f"cannot find a final Gemm/MatMul feeding output '{logits_output}'; name the feature tensor explicitly"
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
    return FeatureEdit(edited, output_name, tensor, chosen_by, diff)
