"""A differentiable torch copy of an ONNX classifier, built from the deployed graph itself.

Why our own converter and not onnx2torch: onnx2torch (1.5.15) imports torchvision at import
time (the registry's torchvision wheels are CUDA builds that break the CPU torch), has no
converter for QuantizeLinear/DequantizeLinear, DynamicQuantizeLinear, MatMulInteger or
ConvInteger (so no int8 model converts at all), and converts Round/Floor/Ceil to plain torch
ops with zero gradients. An attack needs the opposite on exactly those ops: the forward
value of the deployed model and a **straight-through** backward (BPDA, Athalye et al.
2018). ``GraphModule`` interprets the graph node by node with torch ops:

* differentiable ops (Conv, Gemm, MatMul, pooling, activations, shape ops...) are the
  usual torch ops, so a float graph gives exact white-box gradients;
* rounding-like ops (Round, Floor, Ceil, Sign, Cast float -> integer, the rounding inside
  QuantizeLinear and DynamicQuantizeLinear) keep their forward value and pass the gradient
  through unchanged; saturation (the clamp of QuantizeLinear, Clip) keeps its true
  gradient, because QDQ graphs implement ReLU as that clamp;
* integer tensors of quantised graphs are held as float tensors with integer values, so
  MatMulInteger / ConvInteger are float matmul / conv of ``(q - zero_point)``, and the
  QOperator ops (QLinearConv, QLinearMatMul, com.microsoft QGemm) are the same followed by
  a straight-through requantisation; com.microsoft QLinearAdd/Mul/AveragePool/
  GlobalAveragePool/Concat/Sigmoid/LeakyRelu/Softmax are their float op between a
  dequantisation and that requantisation; their channels-last forms (``channels_last=1``,
  and ``NhwcMaxPool``) run the same op between two transposes; other channels-last contrib
  ops (``NhwcConv``, ``QLinearConv`` with ``channels_last``) are refused by name;
* a comparison feeding ``Where`` (a threshold / binarisation) gets the gradient of its
  straight-through relaxation ``(a - b) * (x - t)``;
* a final Softmax or Sigmoid is dropped (``drop_activation``): log-probabilities equal the
  logits up to a per-row constant and a Sigmoid's logit is its input, so attacking the
  activation's input is attacking the deployed scores without float32 saturation.

Nothing here decides whether the copy may be used: ``verify`` compares it with the
onnxruntime session on the audit data, and the caller falls back when it does not match.
Graphs with subgraphs (If/Loop/Scan), custom domains or ops outside ``SUPPORTED`` raise
``ConversionError`` naming them (detection ops such as NonMaxSuppression/RoiAlign included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from attacks.outputs import OutputConvention

#: Ops whose true derivative is zero almost everywhere: they get a straight-through backward.
NON_DIFFERENTIABLE = frozenset({
    "QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "Round", "Floor", "Ceil", "Sign",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal",
})
_INT_ONNX = {
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
}
_QRANGE = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.UINT16: (0, 65535), onnx.TensorProto.INT16: (-32768, 32767)}


class ConversionError(Exception):
    """The graph cannot be turned into a torch module; the message says why (one line)."""


@dataclass
class GraphConversion:
    """A converted graph and what it contains."""

    module: GraphModule
    op_types: list[str]
    non_differentiable: list[str]  # op types given a straight-through backward
    activation_dropped: str | None  # "Softmax" / "Sigmoid" when the final activation was dropped
    logits_name: str  # the tensor the module returns (the activation's input when it was dropped)


@dataclass
class Verification:
    """How the converted module's logits compare with the onnxruntime session."""

    points: int
    max_abs_error: float
    relative_error: float  # max abs error / (1 + max |ort logit|)
    top1_agreement: float
    exact: bool  # within tolerance: usable as the model itself
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"points": self.points, "max_abs_error": self.max_abs_error, "relative_error": self.relative_error,
                "top1_agreement": self.top1_agreement, "exact": self.exact, "reason": self.reason}


def _st(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, backward identity w.r.t. ``x``."""
    if not x.requires_grad:
        return value
    return x + (value - x).detach()


def _ints(a) -> list[int]:
    return [int(v) for v in (a.tolist() if isinstance(a, torch.Tensor) else a)]


def _axis_view(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """Per-axis quantisation parameters broadcast along ``axis`` of an ``ndim`` tensor."""
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = t.numel()
    return t.reshape(shape)


class GraphModule(nn.Module):
    """Runs one ONNX graph with torch ops; returns the logits tensor ``[N, C]``."""

    def __init__(self, model: onnx.ModelProto, output: str, input_name: str) -> None:
        super().__init__()
        g = model.graph
        self.nodes = list(g.node)
        self.output = output
        self.input_name = input_name
        self.int_dtype: dict[str, int] = {}  # onnx dtype of integer-valued tensors
        self._consts: dict[str, torch.Tensor] = {}
        for init in g.initializer:
            arr = numpy_helper.to_array(init)
            self._consts[init.name] = self._tensor(init.name, arr, init.data_type)
        for n in self.nodes:
            if n.op_type == "Constant":
                a = n.attribute[0]
                if a.name == "value":
                    arr, dt = numpy_helper.to_array(a.t), a.t.data_type
                elif a.name in ("value_float", "value_int"):
                    arr = np.array(a.f if a.name == "value_float" else a.i)
                    dt = onnx.TensorProto.FLOAT if a.name == "value_float" else onnx.TensorProto.INT64
                elif a.name in ("value_floats", "value_ints"):
                    arr = np.array(list(a.floats) if a.name == "value_floats" else list(a.ints))
                    dt = onnx.TensorProto.FLOAT if a.name == "value_floats" else onnx.TensorProto.INT64
                else:
                    raise ConversionError(f"Constant with attribute '{a.name}' is not supported")
                self._consts[n.output[0]] = self._tensor(n.output[0], arr, dt)
        self.attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in self.nodes]

    def _tensor(self, name: str, arr: np.ndarray, dt: int) -> torch.Tensor:
        if dt == onnx.TensorProto.INT64 and arr.size <= 64 and arr.ndim <= 1:
            return torch.from_numpy(np.array(arr, dtype=np.int64))  # shapes, axes, indices (int32: biases)
        if dt in _INT_ONNX:
            self.int_dtype[name] = dt
            return torch.from_numpy(np.array(arr, dtype=np.float32))  # quantised values, as exact floats
        if dt == onnx.TensorProto.BOOL:
            return torch.from_numpy(np.array(arr, dtype=bool))
        return torch.from_numpy(np.array(arr, dtype=np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = dict(self._consts)
        env[self.input_name] = x
        soft: dict[str, torch.Tensor] = {}  # straight-through relaxations of comparisons
        for node, at in zip(self.nodes, self.attrs):
            if node.op_type == "Constant":
                continue
            ins = [env[i] if i else None for i in node.input]
            outs = _run(node, at, ins, env, soft, self.int_dtype)
            for name, val in zip(node.output, outs):
                if name:
                    env[name] = val
            if self.output in env:
                break
        return env[self.output]


def _run(node, at, ins, env, soft, int_dtype) -> list[torch.Tensor]:  # noqa: C901 - one dispatch table
    op = node.op_type
    a = ins[0] if ins else None
    if op in _UNARY:
        return [_UNARY[op](a)]
    if op in _BINARY:
        x, y = ins
        if op in ("Add", "Sub", "Mul", "Div") and x.dtype != y.dtype:
            x, y = x.float(), y.float()
        return [_BINARY[op](x, y)]
    if op in ("Round", "Floor", "Ceil", "Sign"):
        fn = {"Round": torch.round, "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign}[op]
        return [_st(a, fn(a))]
    if op == "Relu":
        return [F.relu(a)]
    if op == "LeakyRelu":
        return [F.leaky_relu(a, at.get("alpha", 0.01))]
    if op == "HardSigmoid":
        return [torch.clamp(at.get("alpha", 0.2) * a + at.get("beta", 0.5), 0, 1)]
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else at.get("min")
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else at.get("max")
        lo = float(lo) if lo is not None else None
        hi = float(hi) if hi is not None else None
        return [torch.clamp(a, lo, hi)]
    if op in ("Softmax", "LogSoftmax"):
        fn = torch.softmax if op == "Softmax" else torch.log_softmax
        return [fn(a, dim=at.get("axis", -1))]
    if op == "Gemm":
        b = ins[1]
        c = ins[2] if len(ins) > 2 else None
        if at.get("transA", 0):
            a = a.t()
        if at.get("transB", 0):
            b = b.t()
        y = at.get("alpha", 1.0) * (a @ b)
        if c is not None:
            y = y + at.get("beta", 1.0) * c
        return [y]
    if op == "MatMul":
        return [a @ ins[1]]
    if op in ("Conv", "ConvInteger"):
        w = ins[1]
        bias = None
        if op == "ConvInteger":
            xz = ins[2] if len(ins) > 2 and ins[2] is not None else 0.0
            wz = ins[3] if len(ins) > 3 and ins[3] is not None else 0.0
            a = a - _axis_view(torch.as_tensor(xz, dtype=torch.float32), 1, a.ndim)
            w = w - _axis_view(torch.as_tensor(wz, dtype=torch.float32), 0, w.ndim)
        elif len(ins) > 2:
            bias = ins[2]
        return [_conv(a, w, bias, at)]
    if op == "MatMulInteger":
        b = ins[1]
        az = ins[2] if len(ins) > 2 and ins[2] is not None else 0.0
        bz = ins[3] if len(ins) > 3 and ins[3] is not None else 0.0
        bz = torch.as_tensor(bz, dtype=torch.float32)
        return [(a - torch.as_tensor(az, dtype=torch.float32)) @ (b - (bz if bz.ndim == 0 else bz.reshape(1, -1)))]
    if op in ("QLinearConv", "QLinearMatMul", "QGemm"):
        return [_qlinear(node, at, ins, int_dtype)]
    if op in QLINEAR_FLOAT_OPS:
        return [_qlinear_float(node, at, ins, env, soft, int_dtype)]
    if op == "NhwcMaxPool":  # com.microsoft: int8/uint8 MaxPool on NHWC (max of integers is exact)
        if a.ndim != 4:
            raise ConversionError(f"NhwcMaxPool on a {a.ndim}-D tensor is not supported")
        out = _run(onnx.helper.make_node("MaxPool", [], ["y"]), at, [a.permute(0, 3, 1, 2)], env, soft, int_dtype)[0]
        if node.input[0] in int_dtype:
            int_dtype[node.output[0]] = int_dtype[node.input[0]]
        return [out.permute(0, 2, 3, 1)]
    if op == "QuantizeLinear":
        scale = ins[1]
        zp = ins[2] if len(ins) > 2 and ins[2] is not None else None
        axis = at.get("axis", 1)
        qtype = int_dtype.get(node.input[2], onnx.TensorProto.UINT8) if zp is not None else at.get(
            "output_dtype", onnx.TensorProto.UINT8) or onnx.TensorProto.UINT8
        lo, hi = _QRANGE.get(qtype, (None, None))
        if lo is None:
            raise ConversionError(f"QuantizeLinear to onnx type {qtype} is not supported")
        s = _axis_view(scale, axis, a.ndim)
        z = _axis_view(zp, axis, a.ndim) if zp is not None else 0.0
        v = a / s
        q = torch.clamp(_st(v, torch.round(v)) + z, lo, hi)
        int_dtype[node.output[0]] = qtype
        return [q]
    if op == "DequantizeLinear":
        scale = ins[1]
        zp = ins[2] if len(ins) > 2 and ins[2] is not None else None
        axis = at.get("axis", 1)
        a = a.float()
        z = _axis_view(zp.float(), axis, a.ndim) if zp is not None else 0.0
        return [(a - z) * _axis_view(scale, axis, a.ndim)]
    if op == "DynamicQuantizeLinear":
        d = a.detach()
        lo = torch.clamp(d.min(), max=0.0)
        hi = torch.clamp(d.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        v = a / scale
        q = torch.clamp(_st(v, torch.round(v)) + zp, 0, 255)
        int_dtype[node.output[0]] = onnx.TensorProto.UINT8
        int_dtype[node.output[2]] = onnx.TensorProto.UINT8
        return [q, scale, zp]
    if op == "Cast":
        to = at["to"]
        if to in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            return [a.float()]
        if to == onnx.TensorProto.BOOL:
            return [a != 0]
        if to in _INT_ONNX:
            if a.is_floating_point():
                node_out = node.output[0]
                int_dtype[node_out] = to
                lo, hi = _QRANGE.get(to, (None, None))
                v = _st(a, torch.trunc(a))
                return [torch.clamp(v, lo, hi) if lo is not None else v]
            return [a.long()]
        raise ConversionError(f"Cast to onnx type {to} is not supported")
    if op in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"):
        x, y = ins
        if x.dtype != y.dtype:
            x, y = x.float(), y.float()
        out = {"Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
               "Equal": torch.eq}[op](x, y)
        if op != "Equal" and x.is_floating_point() and (x.requires_grad or y.requires_grad):
            d = x - y if op in ("Greater", "GreaterOrEqual") else y - x
            soft[node.output[0]] = d
        return [out]
    if op == "Where":
        cond, x, y = ins
        if x.dtype != y.dtype:
            x, y = x.float(), y.float()
        out = torch.where(cond, x, y)
        relax = soft.get(node.input[0])
        if relax is not None and out.is_floating_point():
            r = (x - y) * relax
            out = out + (r - r.detach())
        return [out]
    if op in ("Not", "And", "Or", "Xor"):
        fn = {"Not": torch.logical_not, "And": torch.logical_and, "Or": torch.logical_or,
              "Xor": torch.logical_xor}[op]
        return [fn(*ins)]
    if op == "MaxPool":
        if len(node.output) > 1 and node.output[1]:
            raise ConversionError("MaxPool with an indices output is not supported")
        k = at["kernel_shape"]
        return [_pool(a, at, lambda t, pad: F.max_pool2d(
            t, k, at.get("strides", [1] * len(k)), pad, at.get("dilations", [1] * len(k)), bool(at.get("ceil_mode", 0)))
            if len(k) == 2 else F.max_pool1d(t, k, at.get("strides", [1]), pad, at.get("dilations", [1]),
                                             bool(at.get("ceil_mode", 0))), neg=True)]
    if op == "AveragePool":
        k = at["kernel_shape"]
        fn = F.avg_pool2d if len(k) == 2 else F.avg_pool1d
        return [_pool(a, at, lambda t, pad: fn(t, k, at.get("strides", [1] * len(k)), pad,
                                              bool(at.get("ceil_mode", 0)), bool(at.get("count_include_pad", 0))))]
    if op == "GlobalAveragePool":
        return [a.mean(dim=tuple(range(2, a.ndim)), keepdim=True)]
    if op == "GlobalMaxPool":
        return [a.amax(dim=tuple(range(2, a.ndim)), keepdim=True)]
    if op == "BatchNormalization":
        x, sc, b, mean, var = ins[:5]
        shape = [1, -1] + [1] * (x.ndim - 2)
        inv = sc.reshape(shape) / torch.sqrt(var.reshape(shape) + at.get("epsilon", 1e-5))
        return [(x - mean.reshape(shape)) * inv + b.reshape(shape)]
    if op in ("Identity", "Dropout"):
        return [a] + ([torch.ones_like(a, dtype=torch.bool)] if len(node.output) > 1 else [])
    if op == "Flatten":
        ax = at.get("axis", 1) % max(a.ndim, 1)
        return [a.reshape(int(np.prod(a.shape[:ax])), -1)]
    if op == "Reshape":
        shape = _ints(ins[1])
        if not at.get("allowzero", 0):
            shape = [a.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return [a.reshape(shape)]
    if op == "Transpose":
        perm = at.get("perm", list(range(a.ndim))[::-1])
        return [a.permute(*perm)]
    if op == "Squeeze":
        axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else at.get("axes")
        if axes is None:
            return [a.squeeze()]
        for ax in sorted((x % a.ndim for x in axes), reverse=True):
            a = a.squeeze(ax)
        return [a]
    if op == "Unsqueeze":
        axes = _ints(ins[1]) if len(ins) > 1 else at["axes"]
        nd = a.ndim + len(axes)
        for ax in sorted(x % nd for x in axes):
            a = a.unsqueeze(ax)
        return [a]
    if op == "Concat":
        ts = [t for t in ins if t is not None]
        if any(t.is_floating_point() for t in ts):
            ts = [t.float() for t in ts]
        return [torch.cat(ts, dim=at["axis"])]
    if op == "Shape":
        shp = list(a.shape)[at.get("start", 0): at.get("end", None)]
        return [torch.tensor(shp, dtype=torch.int64)]
    if op == "Size":
        return [torch.tensor(a.numel(), dtype=torch.int64)]
    if op == "Gather":
        idx = ins[1].long()
        ax = at.get("axis", 0) % a.ndim
        idx = torch.where(idx < 0, idx + a.shape[ax], idx)
        out = a.index_select(ax, idx.reshape(-1))
        return [out.reshape(list(a.shape[:ax]) + list(idx.shape) + list(a.shape[ax + 1:]))]
    if op == "Slice":
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        sl = [slice(None)] * a.ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if st < 0:
                raise ConversionError("Slice with a negative step is not supported")
            dim = a.shape[ax]
            s = max(0, min(dim, s + dim if s < 0 else s))
            e = max(0, min(dim, e + dim if e < 0 else e))
            sl[ax % a.ndim] = slice(s, e, st)
        return [a[tuple(sl)]]
    if op == "ConstantOfShape":
        val = at.get("value")
        v = numpy_helper.to_array(val) if val is not None else np.zeros(1, np.float32)
        dt = torch.int64 if v.dtype.kind in "iu" else torch.float32
        return [torch.full(_ints(a), float(v.reshape(-1)[0]), dtype=dt)]
    if op == "Expand":
        shape = _ints(ins[1])
        return [a * torch.ones(shape, dtype=a.dtype)]
    if op in ("Max", "Min", "Sum", "Mean"):
        ts = [t for t in ins if t is not None]
        out = ts[0]
        for t in ts[1:]:
            out = {"Max": torch.maximum, "Min": torch.minimum}.get(op, torch.add)(out, t)
        return [out / len(ts) if op == "Mean" else out]
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else at.get("axes")
        keep = bool(at.get("keepdims", 1))
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                return [a]
            axes = list(range(a.ndim))
        dims = tuple(x % a.ndim for x in axes)
        fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}[op]
        return [fn(a, dim=dims, keepdim=keep)]
    if op == "Pad":
        mode = at.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = _ints(ins[1]) if len(ins) > 1 else at["pads"]
        if len(ins) > 3 and ins[3] is not None:
            raise ConversionError("Pad with axes is not supported")
        value = float(ins[2]) if len(ins) > 2 and ins[2] is not None else 0.0
        half = len(pads) // 2
        tp: list[int] = []
        for i in reversed(range(half)):
            tp += [pads[i], pads[i + half]]
        return [F.pad(a, tp, mode="constant" if mode == "constant" else mode, value=value)
                if mode == "constant" else F.pad(a, tp, mode=mode)]
    raise ConversionError(f"op {op} is not supported")  # pragma: no cover - refused at conversion


def _requantize(real, node, ins, y_scale_i, int_dtype):
    """Float result -> output quantisation (straight-through round, true saturation)."""
    if len(ins) <= y_scale_i or ins[y_scale_i] is None:
        return real  # QGemm without y_scale returns float
    ys = ins[y_scale_i]
    yz_name = node.input[y_scale_i + 1] if len(node.input) > y_scale_i + 1 else ""
    yz = ins[y_scale_i + 1] if yz_name else 0.0
    qtype = int_dtype.get(yz_name, onnx.TensorProto.UINT8)
    lo, hi = _QRANGE.get(qtype, (0, 255))
    v = real / ys
    int_dtype[node.output[0]] = qtype
    return torch.clamp(_st(v, torch.round(v)) + yz, lo, hi)


def _qlinear(node, at, ins, int_dtype):
    """QOperator ops: integer products of (q - zero_point) in float, scaled, then requantised."""
    op = node.op_type
    a, a_s, a_z, b, b_s, b_z = ins[:6]
    a = a - a_z
    if op == "QLinearConv":
        w = b - _axis_view(b_z, 0, b.ndim)
        bias = ins[8] if len(ins) > 8 and ins[8] is not None else None
        acc = _conv(a, w, bias, at)
        real = acc * a_s * _axis_view(b_s, 1, acc.ndim)
        return _requantize(real, node, ins, 6, int_dtype)
    if op == "QLinearMatMul":
        bz = b_z if b_z.ndim == 0 or b_z.numel() == 1 else b_z.reshape(1, -1)
        bs = b_s if b_s.ndim == 0 or b_s.numel() == 1 else b_s.reshape(1, -1)
        return _requantize((a @ (b - bz)) * a_s * bs, node, ins, 6, int_dtype)
    # com.microsoft QGemm: A, a_scale, a_zp, B, b_scale, b_zp, C (int32 bias), y_scale, y_zp
    if at.get("transA", 0):
        a = a.t()
    per_col = b_z.ndim > 0 and b_z.numel() > 1
    if at.get("transB", 0):
        b = (b - (b_z.reshape(-1, 1) if per_col else b_z)).t()
    else:
        b = b - (b_z.reshape(1, -1) if per_col else b_z)
    acc = a @ b
    if len(ins) > 6 and ins[6] is not None:
        acc = acc + ins[6]
    bs = b_s.reshape(1, -1) if b_s.ndim > 0 and b_s.numel() > 1 else b_s
    return _requantize(at.get("alpha", 1.0) * acc * a_s * bs, node, ins, 7, int_dtype)


#: com.microsoft QOperator ops that are a float op between a dequantisation of each input
#: and a requantisation of the output (what onnxruntime's QOperator format emits for
#: residual adds, pooling, concatenation and activations of int8 CNNs).
QLINEAR_FLOAT_OPS = {
    "QLinearAdd": "Add", "QLinearMul": "Mul", "QLinearAveragePool": "AveragePool",
    "QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearConcat": "Concat",
    "QLinearSigmoid": "Sigmoid", "QLinearLeakyRelu": "LeakyRelu", "QLinearSoftmax": "Softmax",
}
#: Of those, the ones onnxruntime defines a ``channels_last`` (NHWC) attribute for.
CHANNELS_LAST_OPS = frozenset({"QLinearAveragePool", "QLinearGlobalAveragePool"})
#: Channels-last contrib ops refused, with the reason the audit reports.
REFUSED_CONTRIB = {
    "NhwcConv": "channels-last float convolution (an onnxruntime-optimised graph; export the model unoptimised)",
    "NhwcFusedConv": "channels-last fused convolution (an onnxruntime-optimised graph; export it unoptimised)",
    "QLinearConv": "channels-last QLinearConv (an onnxruntime-optimised graph; export it unoptimised)",
}


def _qlinear_float(node, at, ins, env, soft, int_dtype):
    """Dequantise ``(q - zero_point) * scale``, run the float op, requantise (straight-through round)."""
    op = node.op_type
    last = bool(at.get("channels_last", 0))
    if last and op not in CHANNELS_LAST_OPS:
        raise ConversionError(f"{op} with channels_last is not supported")

    def deq(q, scale, zp):
        return (q - (zp if zp is not None else 0.0)) * scale

    if op == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input
        xs, y_at = [deq(*ins[i:i + 3]) for i in range(2, len(ins), 3)], 0
    elif op in ("QLinearAdd", "QLinearMul"):  # A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp
        xs, y_at = [deq(*ins[0:3]), deq(*ins[3:6])], 6
    else:  # X, X_scale, X_zp, Y_scale, Y_zp
        xs, y_at = [deq(*ins[0:3])], 3
    float_at = {k: v for k, v in at.items() if k not in ("channels_last", "opset")}
    if last:  # NHWC -> NCHW for the float op, back to NHWC after it
        xs = [t.movedim(-1, 1) for t in xs]
    if op == "QLinearSoftmax":
        real = _softmax(xs[0], int(at.get("axis", -1)), int(at.get("opset", 13)))
    else:
        real = _run(onnx.helper.make_node(QLINEAR_FLOAT_OPS[op], [], ["real"]), float_at, xs, env, soft,
                    int_dtype)[0]
    if last:
        real = real.movedim(1, -1)
    return _requantize(real, node, ins, y_at, int_dtype)


def _softmax(x: torch.Tensor, axis: int, opset: int) -> torch.Tensor:
    """Softmax as the ONNX opset that the node names defines it: before 13, over the input
    flattened to 2-D at ``axis``; from 13, along ``axis`` alone."""
    if opset >= 13:
        return torch.softmax(x, dim=axis)
    axis = axis % x.ndim
    flat = x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    return torch.softmax(flat, dim=1).reshape(x.shape)


def _conv(x, w, bias, at):
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ConversionError("Conv with auto_pad is not supported")
    k = len(w.shape) - 2
    pads = at.get("pads", [0] * (2 * k))
    strides = at.get("strides", [1] * k)
    dil = at.get("dilations", [1] * k)
    groups = at.get("group", 1)
    if list(pads[:k]) != list(pads[k:]):
        pad = []
        for i in reversed(range(k)):
            pad += [pads[i], pads[i + k]]
        x = F.pad(x, pad)
        pads = [0] * (2 * k)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return fn(x, w, bias, strides, list(pads[:k]), dil, groups)


def _pool(a, at, fn, neg=False):
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ConversionError("pooling with auto_pad is not supported")
    k = len(at["kernel_shape"])
    pads = at.get("pads", [0] * (2 * k))
    if list(pads[:k]) != list(pads[k:]):
        pad = []
        for i in reversed(range(k)):
            pad += [pads[i], pads[i + k]]
        a = F.pad(a, pad, value=float("-inf") if neg else 0.0)
        pads = [0] * (2 * k)
    return fn(a, list(pads[:k]))


_UNARY = {
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf, "Reciprocal": torch.reciprocal,
    "Softplus": F.softplus, "HardSwish": F.hardswish, "Elu": F.elu,
}
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow}
SUPPORTED = frozenset(_UNARY) | frozenset(_BINARY) | {
    "Round", "Floor", "Ceil", "Sign", "Relu", "LeakyRelu", "HardSigmoid", "Clip", "Softmax", "LogSoftmax", "Gemm",
    "MatMul", "Conv", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "Cast", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Where", "Not", "And", "Or", "Xor",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization", "Identity", "Dropout",
    "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Shape", "Size", "Gather", "Slice",
    "Constant", "ConstantOfShape", "Expand", "Max", "Min", "Sum", "Mean", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "Pad", "QLinearConv", "QLinearMatMul", "QGemm", "NhwcMaxPool", *QLINEAR_FLOAT_OPS,
}
#: The only custom-domain ops converted (onnxruntime's QOperator int8 format emits them).
CUSTOM_DOMAIN = frozenset({("com.microsoft", "QGemm"), ("com.microsoft", "NhwcMaxPool"),
                           *(("com.microsoft", o) for o in QLINEAR_FLOAT_OPS)})


def convert(model: onnx.ModelProto, input_name: str, logits_output: str,
            drop_activation: bool = True) -> GraphConversion:
    """Build the torch copy; raises ``ConversionError`` (one line) for what it cannot run.

    ``drop_activation``: when ``logits_output`` is produced by a Softmax over the class
    axis or a Sigmoid, return that op's input instead (see the module docstring).
    """
    g = model.graph
    refused = sorted({f"com.microsoft.{n.op_type}: {REFUSED_CONTRIB[n.op_type]}" for n in g.node
                      if n.domain == "com.microsoft" and n.op_type in REFUSED_CONTRIB})
    if refused:
        raise ConversionError(f"channels-last contrib ops are not supported ({'; '.join(refused)})")
    bad_domain = sorted({f"{n.domain}.{n.op_type}" for n in g.node
                         if n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in CUSTOM_DOMAIN})
    if bad_domain:
        raise ConversionError(f"custom-domain ops {', '.join(bad_domain)} are not supported")
    with_graphs = sorted({n.op_type for n in g.node for a in n.attribute if a.type in (
        onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)})
    if with_graphs:
        raise ConversionError(f"control-flow ops with subgraphs ({', '.join(with_graphs)}) are not supported")
    ops = sorted({n.op_type for n in g.node})
    missing = [o for o in ops if o not in SUPPORTED]
    if missing:
        raise ConversionError(f"ops not supported by the graph converter: {', '.join(missing)}")
    producer = {o: n for n in g.node for o in n.output}
    out = logits_output
    dropped = None
    p = producer.get(logits_output)
    extra: list[onnx.NodeProto] = []
    if drop_activation and p is not None and p.op_type in ("Softmax", "Sigmoid"):
        axis = next((a.i for a in p.attribute if a.name == "axis"), -1)
        if p.op_type == "Sigmoid" or axis in (-1, 1):
            out, dropped = p.input[0], p.op_type
    elif drop_activation and p is not None and p.op_type == "DequantizeLinear":
        q = producer.get(p.input[0])
        if q is not None and q.op_type in ("QLinearSoftmax", "QLinearSigmoid"):
            axis = next((a.i for a in q.attribute if a.name == "axis"), -1)
            if q.op_type == "QLinearSigmoid" or axis in (-1, 1):
                # the quantised activation's input, dequantised: the logits before the int8 scores
                out, dropped = f"{q.input[0]}__dequantized_logits", q.op_type[len("QLinear"):]
                extra.append(onnx.helper.make_node("DequantizeLinear", list(q.input[:3]), [out]))
    needed = _ancestors(g, out) if not extra else {out}.union(*(_ancestors(g, i) for i in extra[0].input if i))
    module = GraphModule(model, out, input_name)
    module.nodes = module.nodes + extra
    module.nodes = [n for n in module.nodes if any(o in needed for o in n.output)]
    module.attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in module.nodes]
    used = sorted({n.op_type for n in module.nodes})
    nondiff = [o for o in used if o in NON_DIFFERENTIABLE or (o == "Cast" and _casts_to_int(module.nodes))]
    return GraphConversion(module.eval(), used, nondiff, dropped, out)


def final_activation(model: onnx.ModelProto, output: str) -> str | None:
    """"Softmax" / "Sigmoid" when ``output`` is produced by that activation, float or
    quantised (com.microsoft QLinearSoftmax/QLinearSigmoid then DequantizeLinear): the
    output is then probabilities even though its last op is a dequantisation."""
    producer = {o: n for n in model.graph.node for o in n.output}
    p = producer.get(output)
    if p is not None and p.op_type == "DequantizeLinear":
        p = producer.get(p.input[0])
        if p is None or p.op_type not in ("QLinearSoftmax", "QLinearSigmoid"):
            return None
    if p is None:
        return None
    op = p.op_type.removeprefix("QLinear")
    return op if op in ("Softmax", "Sigmoid") else None


def _casts_to_int(nodes) -> bool:
    return any(n.op_type == "Cast" and next(a.i for a in n.attribute if a.name == "to") in _INT_ONNX for n in nodes)


def _ancestors(g: onnx.GraphProto, out: str) -> set[str]:
    producer = {o: n for n in g.node for o in n.output}
    seen: set[str] = set()
    stack = [out]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        n = producer.get(t)
        if n is not None:
            stack.extend(i for i in n.input if i)
            seen.update(n.output)
    return seen


def verify(module: nn.Module, reference: np.ndarray, x: np.ndarray, convention: OutputConvention,
           rel_tol: float = 1e-3) -> Verification:
    """Compare the module's logits with the session's on ``x``.

    ``reference`` is what the session returned, as logits (``OutputConvention.to_logits``):
    log-probabilities are compared after ``log_softmax``, which removes the per-row
    constant; both are compared only where float32 outputs still carry the logit.
    """
    with torch.no_grad():
        z = torch.cat([module(torch.from_numpy(np.ascontiguousarray(x[i:i + 256], np.float32)))
                       for i in range(0, len(x), 256)])
    if not torch.isfinite(z).all():
        return Verification(len(x), float("inf"), float("inf"), 0.0, False, "the converted graph returns NaN/Inf")
    ours = z.numpy().astype(np.float64)
    ref = reference.astype(np.float64)
    if convention is not OutputConvention.LOGITS:
        if convention is OutputConvention.PROBABILITIES:
            ours = torch.log_softmax(torch.from_numpy(ours), 1).numpy()
            ref = torch.log_softmax(torch.from_numpy(ref), 1).numpy()
        keep = convention.comparable(ref)
        if len(x) and not keep.any():
            return Verification(len(x), float("inf"), float("inf"), 0.0, False,
                                "every output is saturated: nothing to compare the converted graph with")
        err = float(np.abs(np.where(keep, ours - ref, 0.0)).max()) if len(x) else 0.0
        scale = 1.0
    else:
        err = float(np.abs(ours - ref).max()) if len(x) else 0.0
        scale = 1.0 + float(np.abs(ref).max()) if len(x) else 1.0
    unique = (ref == ref.max(1, keepdims=True)).sum(1) == 1  # saturated ties have no top-1 to agree on
    agree = float(np.mean(ours.argmax(1)[unique] == ref.argmax(1)[unique])) if unique.any() else 1.0
    rel = err / scale
    exact = rel <= rel_tol and agree == 1.0
    reason = None if exact else (f"converted graph differs from onnxruntime: max |error| {err:.3g} "
                                 f"(relative {rel:.3g}, tolerance {rel_tol:g}), top-1 agreement {agree:.1%}")
    return Verification(len(x), err, rel, agree, exact, reason)
