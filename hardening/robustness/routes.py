"""Which gradients can reach a variant, decided from what it is and what was verified.

A gradient attack is only as good as the gradients it follows. For every variant we
look for, in order: its own PyTorch source (when its outputs match the session), a
torch copy of the deployed ONNX graph (``attacks.onnx_torch``; used only when its
logits match onnxruntime on the audit points), the graph copy with straight-through
backward for non-differentiable ops (BPDA), and a float parent source (BPDA forward =
deployed session, plus transfer). What was found, refused and why is kept in
``GraphRoute``/``OutputConvention`` so findings and the report say what actually ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx
from torch import nn

from attacks.estimators import OrtLogits, StraightThrough
from attacks.onnx_torch import ConversionError, convert, verify
from attacks.outputs import OutputConvention

APPROX_MIN_AGREEMENT = 0.9  # a graph copy this close is still a useful backward for BPDA
SCALE_MARGIN = 50.0  # median logit margin above which CE gradients saturate in float32
SCALE_TARGET = 10.0  # ... and the margin the CE-based attacks are shown instead


class GraphStatus(str, Enum):
    EXACT = "exact"  # differentiable copy, logits match: white-box gradients
    STRAIGHT_THROUGH = "straight-through"  # matches, with straight-through backward: BPDA
    APPROXIMATE = "approximate"  # close but not exact: backward only, forward = session
    MISMATCH = "mismatch"  # converted but does not match: not used
    REFUSED = "refused"  # could not be converted: not used


@dataclass
class GraphRoute:
    """The torch copy of the deployed graph and whether it may be used."""

    status: GraphStatus
    reason: str | None = None
    op_types: list[str] = field(default_factory=list)
    non_differentiable: list[str] = field(default_factory=list)
    activation_dropped: str | None = None
    verification: dict | None = None
    module: nn.Module | None = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        return self.module is not None

    @property
    def differentiable(self) -> bool:
        return self.status == GraphStatus.EXACT

    def to_dict(self) -> dict:
        return {"status": self.status.value, "reason": self.reason, "op_types": self.op_types,
                "non_differentiable": self.non_differentiable, "activation_dropped": self.activation_dropped,
                "verification": self.verification}


def graph_route(path: str, input_name: str, logits_output: str, ort_fn: OrtLogits, x: np.ndarray,
                session_scores: np.ndarray | None = None) -> GraphRoute:
    """Convert the ONNX file and verify the copy against the session on ``x``
    (``session_scores``: ``ort_fn(x)`` when the caller has it already)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        conv = convert(model, input_name, logits_output)
        ver = verify(conv.module, ort_fn(x) if session_scores is None else session_scores, x, ort_fn.convention)
    except ConversionError as e:
        return GraphRoute(GraphStatus.REFUSED, str(e))
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:  # torch refused a shape or dtype
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        return GraphRoute(GraphStatus.REFUSED, f"the converted graph failed to run: {first}")
    base = dict(op_types=conv.op_types, non_differentiable=conv.non_differentiable,
                activation_dropped=conv.activation_dropped, verification=ver.to_dict())
    if "DynamicQuantizeLinear" in conv.non_differentiable and ver.top1_agreement >= APPROX_MIN_AGREEMENT:
        # its quantisation scale is computed over the whole batch (the session judges it row by
        # row, see batch_dependent): the copy gives the backward, the session the forward
        return GraphRoute(GraphStatus.STRAIGHT_THROUGH, None, module=StraightThrough(conv.module, ort_fn), **base)
    if ver.exact:
        status = GraphStatus.STRAIGHT_THROUGH if conv.non_differentiable else GraphStatus.EXACT
        return GraphRoute(status, None, module=conv.module, **base)
    if ver.top1_agreement >= APPROX_MIN_AGREEMENT:
        return GraphRoute(GraphStatus.APPROXIMATE, ver.reason, module=StraightThrough(conv.module, ort_fn), **base)
    return GraphRoute(GraphStatus.MISMATCH, ver.reason, **base)


def batch_dependent(path: str) -> bool:
    """DynamicQuantizeLinear takes its scale from the min/max of the whole input batch, so a
    row's prediction depends on the rows sent with it. Such a model is judged one row at a
    time: what a device answering single queries does, and the same for every attack."""
    model = onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node)


def same_outputs(ours: np.ndarray, ref: np.ndarray, convention: OutputConvention) -> bool:
    """The source's logits equal the session's (up to a per-row constant for log-probabilities),
    where the float32 outputs still carry them."""
    if convention is OutputConvention.PROBABILITIES:
        ours, ref = ours - ours.max(1, keepdims=True), ref - ref.max(1, keepdims=True)
    keep = convention.comparable(ref)
    return bool(np.abs(np.where(keep, ours - ref, 0)).max() <= 1e-3 * (1 + np.abs(np.where(keep, ref, 0)).max()))


def logit_scale(scores: np.ndarray, y: np.ndarray) -> float:
    """Factor that brings a huge median margin down to ``SCALE_TARGET`` (1.0 when not needed).

    Cross-entropy on logits with margins in the hundreds has float32 gradients that are
    exactly zero; a constant factor changes neither the argmax nor the DLR loss."""
    ok = scores.argmax(1) == y
    if not ok.any():
        return 1.0
    z = scores[ok]
    top2 = np.sort(z, axis=1)[:, -2:] if z.shape[1] > 1 else np.zeros((len(z), 2))
    margin = float(np.median(top2[:, 1] - top2[:, 0]))
    return SCALE_TARGET / margin if margin > SCALE_MARGIN else 1.0
