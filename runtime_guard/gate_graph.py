"""The anomaly gate's scoring program as ONNX nodes, run by onnxruntime.

A request's gate work is a few dozen small products and reductions; as numpy calls each
paid a Python dispatch, so the gate cost several times its multiply-adds. As nodes the whole
program (the compact input view, every view's product, every reduction, the term matrix, the
posts and the fusion) runs over onnxruntime's kernels: alone as ``GateGraph`` (audits,
fitting; ``ViewGraph`` for the input view alone), or on the device as a part appended to the
user's model (``gate_extension``), so one ``InferenceSession.run`` answers model and gate and
the gate reads the model's tensors where they are. The nodes are built on the device from the
declared detectors (``anomaly._Program``) and never shipped, so the signed
``detectors.npz``/``detectors.json`` stay the only definition of the maths."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from .anomaly import _Program, _ViewPlan

__all__ = ["Fusion", "GATE_OUTPUTS", "GateGraph", "ViewGraph", "gate_extension", "pool_matrix", "tensor_dims"]

OPSET = 17
_F, _D = TensorProto.FLOAT, TensorProto.DOUBLE
GATE_PREFIX = "edgeward_gate/"  # every name of the gate's part of a user's model
GATE_OUTPUTS = (GATE_PREFIX + "scores", GATE_PREFIX + "check")


@dataclass(frozen=True)
class Fusion:
    """The fused score folded into the graph: ``rule`` with the members' means, weights
    (``1 / (k * std)``), inverse stds and the constant offset (``AnomalyScorer``)."""

    rule: str
    mean: np.ndarray
    weights: np.ndarray
    inv_std: np.ndarray
    offset: float


class _Builder:
    """Nodes and initializers of one graph (or graph part) for ONNX ``opset``; every name it
    makes starts with ``prefix``, so a part appended to a user's model cannot meet its names."""

    def __init__(self, opset: int = OPSET, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.prefix = prefix
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), n))
        return n

    def op(self, op: str, inputs: list[str], hint: str | None = None, n_out: int = 1, out: str | None = None,
           **attrs: Any) -> Any:
        outs = [self.prefix + out] if out is not None else [self.name(hint or op.lower()) for _ in range(n_out)]
        if op in _REDUCE_AXES_INPUT and "axes" in attrs and self.opset >= 18:  # opset 18: axes became an input
            inputs = [*inputs, self.const(attrs.pop("axes"), np.int64, "axes")]
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0], **attrs))
        return outs[0] if n_out == 1 else outs


_REDUCE_AXES_INPUT = ("ReduceMin", "ReduceMax", "ReduceSumSquare", "ReduceLogSumExp")


def _view_nodes(b: _Builder, view: Any, x: str, image: bool = False) -> str:
    """The compact input view (``anomaly.InputView``) of raw inputs ``x`` (n, ...) as nodes:
    the tensor (n, width) float32 the input-space detectors read. ``image``: ``x`` is known
    to be (n, C, H, W) already (a reshape of an input is a copy in onnxruntime)."""
    if view.kind == "avgpool":
        c, h, w = view.shape
        oh, ow = view.out
        img = x if image else b.op("Reshape", [x, b.const([-1, c, h, w], np.int64, "shape")])
        # rows @ img @ cols^T for equal bins too: one formulation, and no slower than
        # onnxruntime's AveragePool (benchmarks/bench_view_pooling.py)
        cols = b.op("MatMul", [img, b.const(pool_matrix(w, ow).T, np.float32, "cols")])
        pooled = b.op("MatMul", [b.const(pool_matrix(h, oh), np.float32, "rows"), cols])
        out: str = b.op("Flatten", [pooled], axis=1)
        return out
    out = b.op("Flatten", [x], axis=1)
    if view.kind == "projection":
        out = b.op("MatMul", [out, b.const(view.matrix, np.float32, "projection")])
    return out


def pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix over adaptive bins ``floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out)``."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _plan_terms(b: _Builder, plan: _ViewPlan, v: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], str | None]:
    """This view's part of T as (first term column, (n, c) tensor) pieces, float32 and
    float64 (logit terms), and the tensor whose sum must be finite when the view itself is
    checked (logits)."""
    pieces: list[tuple[int, str]] = []
    f32: list[tuple[int, str]] = []
    sq = inv = None
    if plan.sq_col is not None or plan.scaled:
        sq = b.op("ReduceSumSquare", [v], axes=[1], keepdims=1)
        if plan.scaled:
            inv = b.op("Reciprocal", [b.op("Max", [b.op("Sqrt", [sq]), b.const([1e-12], np.float32)])])
    if plan.matrix is not None:
        p = b.op("MatMul", [v, b.const(plan.matrix, np.float32, "blocks")], "product")
        if plan.offsets is not None:
            p = b.op("Add", [p, b.const(plan.offsets, np.float32, "offsets")])
        # segments of the product in column order: min blocks, kth blocks, sumsq blocks, the col block
        segs: list[tuple[str, int, int, Any]] = []
        m_bounds = list(plan.min_starts) + [plan.p_min.stop]
        for i in range(len(plan.min_starts)):
            segs.append(("min", int(m_bounds[i]), int(m_bounds[i + 1]), plan.t_min.start + i))
        for sl, k, c, scaled in plan.kth:
            segs.append(("kth", sl.start, sl.stop, (c, k, scaled)))
        s_bounds = [plan.p_ss.start + int(s) for s in plan.ss_starts] + [plan.p_ss.stop]
        for i in range(len(plan.ss_starts)):
            segs.append(("sumsq", s_bounds[i], s_bounds[i + 1], plan.t_ss.start + i))
        if plan.p_col.stop > plan.p_col.start:
            segs.append(("col", plan.p_col.start, plan.p_col.stop, plan.t_col.start))
        segs.sort(key=lambda s: s[1])
        sizes = [s[2] - s[1] for s in segs]
        parts = [p] if len(segs) == 1 else b.op("Split", [p, b.const(sizes, np.int64, "sizes")], n_out=len(segs), axis=1)
        for (kind, lo, hi, info), seg in zip(segs, parts):
            if kind == "min":
                t = b.op("ReduceMin", [seg], axes=[1], keepdims=1)
                if info < plan.t_min_scaled.stop:
                    t = b.op("Mul", [t, inv])  # type: ignore[list-item]
                f32.append((info, t))
            elif kind == "kth":
                c, k, scaled = info
                if k < hi - lo:
                    vals = b.op("TopK", [seg, b.const([k], np.int64, "k")], n_out=2, axis=1, largest=0, sorted=1)[0]
                    t = b.op("Slice", [vals, b.const([k - 1], np.int64), b.const([k], np.int64), b.const([1], np.int64)])
                else:
                    t = b.op("ReduceMax", [seg], axes=[1], keepdims=1)
                f32.append((c, b.op("Mul", [t, inv]) if scaled else t))  # type: ignore[list-item]
            elif kind == "sumsq":
                f32.append((info, b.op("ReduceSumSquare", [seg], axes=[1], keepdims=1)))
            else:
                f32.append((info, seg))
    if plan.sq_col is not None:
        f32.append((plan.sq_col, sq))  # type: ignore[arg-type]
    if plan.usq_col is not None:
        f32.append((plan.usq_col, b.op("Mul", [b.op("Mul", [sq, inv]), inv])))  # type: ignore[list-item]
    check = None
    if plan.logit_cols:
        vd = b.op("Cast", [v], to=_D)
        check = vd if plan.check else None
        for temp, (lse_col, max_col) in plan.logit_cols.items():
            zz = vd if temp == 1.0 else b.op("Div", [vd, b.const([temp], np.float64)])
            if lse_col is not None:
                pieces.append((lse_col, b.op("ReduceLogSumExp", [zz], axes=[1], keepdims=1)))
            if max_col is not None:
                pieces.append((max_col, b.op("ReduceMax", [zz], axes=[1], keepdims=1)))
    elif plan.check:
        check = b.op("Cast", [v], to=_D)
    return f32, pieces, check


def _gate_nodes(b: _Builder, prog: _Program, fusion: Fusion | None, tensors: dict[str, str]) -> None:
    """Every node of ``prog`` (with ``fusion`` its fused score) reading each view from
    ``tensors`` (view -> (n, width) float32 tensor), writing ``scores`` and ``check``."""
    f32, f64, checks = [], [], []
    for plan in prog.plans:
        got32, got64, check = _plan_terms(b, plan, tensors[plan.view])
        f32 += got32
        f64 += got64
        if check is not None:
            checks.append(b.op("ReduceSum", [check], keepdims=0))
    # T's columns in the order built (float32 terms, one cast, then the float64 ones);
    # A's rows permuted to match, so no per-term cast or reordering runs per request
    order, parts = [], []
    for group, cast in ((f32, True), (f64, False)):
        if not group:
            continue
        names = [t for _, t in group]
        block = names[0] if len(names) == 1 else b.op("Concat", names, axis=1)
        parts.append(b.op("Cast", [block], to=_D) if cast else block)
        order += [c for c, _ in group]
    t = parts[0] if len(parts) == 1 else b.op("Concat", parts, axis=1)
    if checks:
        b.op("Sum", [b.op("ReduceSum", [t], keepdims=0), *checks], out="check")
    else:
        b.op("ReduceSum", [t], keepdims=0, out="check")
    a_rows = _rows(order, f32 + f64, prog.n_terms)
    raw = b.op("MatMul", [t, b.const(prog.a[a_rows], np.float64, "A")])
    if prog.c is not None:
        raw = b.op("Add", [raw, b.const(prog.c, np.float64)])
    if prog.relu:
        raw = b.op("Max", [raw, b.const(prog.lo, np.float64, "lo")])
    if prog.sqrt:
        raw = b.op("Where", [b.const(prog.sqrt_mask, np.bool_), b.op("Sqrt", [raw]), raw])
    if prog.exp:
        one_minus = b.op("Sub", [b.const(1.0, np.float64), b.op("Exp", [raw])])
        raw = b.op("Where", [b.const(prog.exp_mask, np.bool_), one_minus, raw])
    if fusion is None:
        b.op("Identity", [raw], out="scores")
    elif fusion.rule == "max_z":
        z = b.op("Mul", [b.op("Sub", [raw, b.const(fusion.mean, np.float64)]), b.const(fusion.inv_std, np.float64)])
        b.op("ReduceMax", [z], axes=[1], keepdims=0, out="scores")
    else:
        if fusion.rule == "mean_pos_z":  # max(z, 0) = (max(s, mean) - mean) / std
            raw = b.op("Max", [raw, b.const(fusion.mean, np.float64, "mean")])
        w = b.const(fusion.weights[:, None], np.float64, "w")
        fused = b.op("Gemm", [raw, w, b.const([-fusion.offset], np.float64)])
        b.op("Reshape", [fused, b.const([-1], np.int64)], out="scores")


def _outputs(b: _Builder, prog: _Program, fusion: Fusion | None) -> list[onnx.ValueInfoProto]:
    dims: list[Any] = ["n"] if fusion is not None else ["n", len(prog.dets)]
    return [helper.make_tensor_value_info(b.prefix + "scores", _D, dims),
            helper.make_tensor_value_info(b.prefix + "check", _D, [])]


def _model(b: _Builder, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str) -> bytes:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)], producer_name="edgeward")
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


class _Session:
    """An onnxruntime session over ``model_bytes``, made on first use in each process
    (sessions do not survive a fork, so a child makes its own)."""

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes
        self._session: ort.InferenceSession | None = None
        self._built_in = -1  # the _forks count the session was made under

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._built_in != _forks:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(self.model_bytes, opts, providers=["CPUExecutionProvider"])
            self._built_in = _forks
        assert self._session is not None
        res: list[np.ndarray] = self._session.run(outputs, feeds)
        return res


class ViewGraph(_Session):
    """``anomaly.InputView`` as a one-input graph: raw inputs (n, *view.dims) float32 -> (n, width)."""

    def __init__(self, view: Any) -> None:
        b = _Builder()
        b.op("Identity", [_view_nodes(b, view, "x", True)], out="view")
        super().__init__(_model(b, [helper.make_tensor_value_info("x", _F, ["n", *view.dims])],
                                [helper.make_tensor_value_info("view", _F, ["n", view.width or "w"])], "edgeward_view"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(["view"], {"x": x})[0]


class GateGraph(_Session):
    """One onnxruntime session computing a ``_Program``'s raw scores, or with ``fusion`` the
    fused score.

    Inputs: the views the program reads, ``input`` as the raw model input shaped
    (n, *input_view.dims) (the program's ``input_view`` is applied in the graph),
    ``logits``/``features`` as (n, width) float32. Outputs: ``scores``, (n, k) float64 raw scores or (n,) fused, and ``check``, the
    sum of the term matrix (and of a checked view): not finite when a view held NaN/Inf.
    """

    def __init__(self, prog: _Program, fusion: Fusion | None = None) -> None:
        b = _Builder()
        tensors, inputs = {}, []
        for plan in prog.plans:
            raw = plan.view == "input"
            dims = prog.input_view.dims if raw else [plan.width or "w"]
            inputs.append(helper.make_tensor_value_info(plan.view, _F, ["n", *dims]))
            tensors[plan.view] = _view_nodes(b, prog.input_view, plan.view, True) if raw else plan.view
        _gate_nodes(b, prog, fusion, tensors)
        super().__init__(_model(b, inputs, _outputs(b, prog, fusion), "edgeward_gate"))

    def score(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        """(scores, check) for the views' arrays."""
        scores, check = self.run(_OUT, feeds)
        return scores, float(check)


_OUT = ["scores", "check"]
_forks = 0  # forks into this process: a session made before one is remade in the child


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def gate_extension(prog: _Program, fusion: Fusion | None, model: onnx.ModelProto, tensors: dict[str, str]) -> bytes:
    """The gate as a part of the user's model: serialized ``ModelProto`` holding only graph
    nodes, initializers and the outputs ``GATE_OUTPUTS``, for ``model`` (its opset) reading
    each view from the model's tensor ``tensors[view]`` (``input``: the model's input).

    Appended to the model's serialized bytes it *is* part of the model: protobuf parses
    concatenated messages as one, their repeated fields (nodes, initializers, outputs)
    joined in order, so the gate's nodes follow the model's and onnxruntime runs model and
    gate in one ``run``. Neither the model's bytes nor its weights are copied or touched
    (a streamed load streams this after the model)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    b = _Builder(opset, GATE_PREFIX)
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    feeds = {}
    for view in prog.views:  # a float16/double tensor is read as float32, as the standalone gate reads it
        t = tensors[view]
        value = values.get(t)
        elem = _F if value is None else value.type.tensor_type.elem_type
        t = t if elem == _F else b.op("Cast", [t], to=_F)
        shape = (tensor_dims(value) if value is not None else None) or []
        if view == "input":
            feeds[view] = _view_nodes(b, prog.input_view, t, shape[1:] == prog.input_view.dims)
        else:  # (n, C, 1, 1) features read as (n, C), as the standalone gate reshapes them
            feeds[view] = t if len(shape) == 2 else b.op("Flatten", [t], axis=1)
    _gate_nodes(b, prog, fusion, feeds)
    part = onnx.ModelProto()
    part.graph.node.extend(b.nodes)
    part.graph.initializer.extend(b.inits)
    part.graph.output.extend(_outputs(b, prog, fusion))
    data: bytes = part.SerializeToString()
    return data


def tensor_dims(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """A model tensor's shape as onnxruntime reports it (None: no shape declared)."""
    t = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _rows(order: list[int], pieces: list[tuple[int, str]], n_terms: int) -> list[int]:
    """Rows of A in T's built column order (a piece may span several term columns)."""
    starts = sorted(c for c, _ in pieces) + [n_terms]  # the pieces tile T's columns
    widths = {c: starts[i + 1] - c for i, c in enumerate(starts[:-1])}
    rows: list[int] = []
    for c in order:
        rows += list(range(c, c + widths[c]))
    return rows
