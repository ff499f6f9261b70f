"""Quantization at a chosen bit width (``w8a8``, ``w4a8``, ``w4a4``): post-training static QDQ
(``ptq``), quantization-aware training (``qat``) and mixed precision (``mixed``).

All three write their QDQ graph with the same onnxruntime quantizer, calibration (MinMax on
the calibration split) and settings (weights symmetric per channel, activations asymmetric
per tensor), so at one bit width they differ only in what they say they differ in.

QAT is eager fake-quant (``torch.ao.quantization.FakeQuantize`` on every Conv2d/Linear weight
and input, straight-through gradients): torch 2.13 no longer ships the PT2E flow
(``import torch.ao.quantization.quantize_pt2e`` raises ``ModuleNotFoundError``; it moved to
torchao). The fake-quant grids are onnxruntime's (int8 symmetric [-127, 127], int4 [-8, 7],
activations [0, 2^a - 1]), so the trained weights sit where the QDQ export rounds them.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hardening.errors import InputError
from hardening.harden.base import Context, Result, Timer, batches, logits

QUANT_BITS = ("w8a8", "w4a8", "w4a4")
QUANT_OPS = ("Conv", "MatMul", "Gemm")


def parse_bits(text: str) -> tuple[int, int]:
    if text not in QUANT_BITS:
        raise InputError(f"unknown --quant-bits {text!r}; choose from {', '.join(QUANT_BITS)}")
    w, a = text[1:].split("a")
    return int(w), int(a)


def _qtype(bits: int, signed: bool):
    from onnxruntime.quantization import QuantType

    return {(8, True): QuantType.QInt8, (8, False): QuantType.QUInt8,
            (4, True): QuantType.QInt4, (4, False): QuantType.QUInt4}[(bits, signed)]


def quantizable_nodes(pre_processed: Path) -> list[str]:
    """Names of the nodes the quantizer would turn into QDQ compute (Conv, MatMul, Gemm)."""
    import onnx

    return [n.name for n in onnx.load(str(pre_processed)).graph.node if n.op_type in QUANT_OPS]


def qdq_static(src: Path, dst: Path, input_name: str, x_cal: np.ndarray, bits: str,
               exclude: tuple[str, ...] = (), pre_processed: Path | None = None) -> dict:
    """onnxruntime static QDQ quantization at ``bits``; ``exclude`` names nodes kept in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    from hardening.compression import _CalibrationReader, _pre_processed

    wb, ab = parse_bits(bits)
    log = logging.getLogger()
    level = log.level
    log.setLevel(logging.ERROR)  # the 4-bit types' "com.microsoft domain" notice, once per call
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pre = pre_processed or _pre_processed(src, Path(tmp))
            quantize_static(str(pre), str(dst), _CalibrationReader(input_name, x_cal), quant_format=QuantFormat.QDQ,
                            activation_type=_qtype(ab, False), weight_type=_qtype(wb, True), per_channel=True,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(exclude))
    finally:
        log.setLevel(level)
    _check_runs(dst, bits)
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "pre_process": "quant_pre_process",
            "bits": bits, "weight_bits": wb, "activation_bits": ab, "weights": f"int{wb} symmetric per channel",
            "activations": f"uint{ab} asymmetric per tensor", "calibration": "MinMax",
            "calibration_samples": int(len(x_cal)), "nodes_in_float": list(exclude)}


def _check_runs(path: Path, bits: str) -> None:
    """onnxruntime writes graphs it cannot load: 4-bit activations into MaxPool or a fused
    QLinearConv are refused at session creation (INVALID_GRAPH); say so in one line."""
    import onnxruntime as ort

    from hardening.intake import make_session

    try:
        make_session(path)
    except Exception as e:  # onnxruntime raises its own pybind exception types
        first = str(e).splitlines()[0][:200]
        raise InputError(f"onnxruntime {ort.__version__} cannot run this model quantized at {bits}: {first}") from None


def _calibration(ctx: Context) -> np.ndarray:
    return ctx.ds.calibration()[0]


def ptq(ctx: Context, float_onnx: Path, dst: Path) -> dict:
    """Post-training static quantization of the float parent at ``ctx.quant_bits``."""
    from hardening.intake import load_model

    rec = qdq_static(float_onnx, dst, load_model(float_onnx).input_name, _calibration(ctx), ctx.quant_bits)
    return {**rec, "method": "post-training static quantization (no retraining)", "retrained": False,
            "seed": ctx.seed}


# --- quantization-aware training -------------------------------------------------------

def _fake_quant(model: nn.Module, wb: int, ab: int) -> tuple[list, nn.ModuleList]:
    """Fake-quantize every Conv2d/Linear weight (parametrization) and input (pre-hook), and the
    last layer's output: onnxruntime's QDQ graph quantizes the logits too (at 4 bits, 16 levels)."""
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torch.nn.utils import parametrize

    qmin, qmax = (-127, 127) if wb == 8 else (-(2 ** (wb - 1)), 2 ** (wb - 1) - 1)  # onnxruntime's grids
    hooks, acts = [], nn.ModuleList()

    def act_fq() -> nn.Module:
        aq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2 ** ab - 1,
                          dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        acts.append(aq)
        return aq

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        parametrize.register_parametrization(m, "weight", FakeQuantize(
            observer=MovingAveragePerChannelMinMaxObserver, quant_min=qmin, quant_max=qmax, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric, ch_axis=0, averaging_constant=1.0))  # the current weights' range
        pre = act_fq()
        hooks.append(m.register_forward_pre_hook(lambda _m, inp, q=pre: (q(inp[0]),)))
    if layers:
        post = act_fq()
        hooks.append(layers[-1].register_forward_hook(lambda _m, _inp, out, q=post: q(out)))
    return hooks, acts


def _strip_fake_quant(model: nn.Module, hooks: list) -> None:
    from torch.nn.utils import parametrize

    for h in hooks:
        h.remove()
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)  # the float latent weights


def qat(ctx: Context) -> Result:
    """Fine-tune the float source under fake quantization at ``ctx.quant_bits``; the QDQ graph is
    written afterwards by ``qat_export`` with the quantizer ``ptq`` uses."""
    b = ctx.budget("qat")
    wb, ab = parse_bits(ctx.quant_bits)
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher)
    hooks, acts = _fake_quant(model, wb, ab)
    opt = torch.optim.Adam([p for n, p in model.named_parameters()], lr=b["lr"])
    x, y = ctx.x_train, ctx.y_train
    model.train()
    with Timer() as t:
        for epoch in range(b["epochs"]):
            if epoch == b["freeze_observers_after"]:
                for aq in acts:  # activation ranges settle; weights keep their live range
                    aq.disable_observer()
            for idx in batches(len(x), b["batch"], g):
                opt.zero_grad()
                nn.functional.cross_entropy(logits(model, x[idx]), y[idx]).backward()
                opt.step()
    _strip_fake_quant(model, hooks)
    recipe = {
        "tool": "torch.ao.quantization.FakeQuantize (eager fake-quant, straight-through) + "
                "onnxruntime.quantization.quantize_static (QDQ export)",
        "method": "quantization-aware fine-tuning from the float source's weights, then static QDQ at the same bits",
        "why_not_pt2e": f"torch {torch.__version__} has no torch.ao.quantization.quantize_pt2e "
                        "(ModuleNotFoundError: the PT2E flow moved to torchao)",
        "bits": ctx.quant_bits, "fake_quant_weights": f"int{wb} symmetric per channel (onnxruntime's grid)",
        "fake_quant_activations": f"uint{ab} per tensor at every Conv2d/Linear input and the logits, "
                                  "moving-average min/max",
        "freeze_observers_after": b["freeze_observers_after"], "epochs": b["epochs"], "batch": b["batch"],
        "optimizer": "Adam", "lr": b["lr"], "init": "float source weights", "train_samples": int(len(x)),
        "seed": ctx.seed, "train_seconds": t.seconds,
    }
    return Result(model.eval(), ctx.arch, dict(ctx.kwargs), recipe)


def qat_export(ctx: Context, res: Result, float_export: Path, dst: Path) -> dict:
    """The QAT-trained float graph -> QDQ at the bits it was trained for."""
    from hardening.intake import load_model

    rec = qdq_static(float_export, dst, load_model(float_export).input_name, _calibration(ctx), ctx.quant_bits)
    return {"export": {k: v for k, v in rec.items() if k != "bits"}}


# --- mixed precision -------------------------------------------------------------------

def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    from hardening.harden.pipeline import onnx_accuracy

    return onnx_accuracy(path, x, y)


def mixed(ctx: Context, float_onnx: Path, dst: Path) -> dict:
    """Quantize at ``ctx.quant_bits`` but keep in float the nodes where quantization costs the
    most: one-at-a-time sensitivity (only that node quantized, the rest excluded through
    ``nodes_to_exclude``), then the most sensitive kept in float until the whole graph is within
    ``tolerance`` of float accuracy. Selection is on the training split, never on ``x``.
    When the fully quantized graph is already within ``tolerance`` nothing needs to stay float,
    and the per-node pass (one quantization per Conv/MatMul/Gemm: minutes on a MobileNet) is
    skipped."""
    from hardening.compression import _pre_processed
    from hardening.intake import load_model

    b = ctx.budget("mixed")
    x_cal = _calibration(ctx)
    xs, ys = ctx.ds.x_train, ctx.ds.y_train
    name = load_model(float_onnx).input_name
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        pre = _pre_processed(float_onnx, tmp_p)
        nodes = quantizable_nodes(pre)
        base = _accuracy(float_onnx, xs, ys)
        sens: dict[str, float] = {}
        qdq_static(float_onnx, tmp_p / "all.onnx", name, x_cal, ctx.quant_bits, pre_processed=pre)
        whole = _accuracy(tmp_p / "all.onnx", xs, ys)
        for n in nodes if base - whole > b["tolerance"] else ():
            qdq_static(float_onnx, tmp_p / "one.onnx", name, x_cal, ctx.quant_bits,
                       exclude=tuple(m for m in nodes if m != n), pre_processed=pre)
            sens[n] = round(base - _accuracy(tmp_p / "one.onnx", xs, ys), 6)
        order = sorted(nodes, key=lambda n: (-sens.get(n, 0.0), nodes.index(n)))
        kept: list[str] = []
        trail = []
        while True:
            if kept:
                qdq_static(float_onnx, tmp_p / "try.onnx", name, x_cal, ctx.quant_bits, exclude=tuple(kept),
                           pre_processed=pre)
            acc = _accuracy(tmp_p / "try.onnx", xs, ys) if kept else whole
            trail.append({"nodes_in_float": list(kept), "selection_accuracy": acc})
            if base - acc <= b["tolerance"] or len(kept) == len(nodes) - 1:
                break
            kept.append(order[len(kept)])
        rec = qdq_static(float_onnx, dst, name, x_cal, ctx.quant_bits, exclude=tuple(kept), pre_processed=pre)
    return {**rec, "method": "mixed precision: most int-sensitive nodes kept in float (one-at-a-time sensitivity)",
            "tolerance": b["tolerance"], "selection_split": "x_train", "selection_float_accuracy": base,
            "sensitivity": sens, "sensitivity_skipped": not sens, "greedy_trail": trail, "retrained": False, "seed": ctx.seed}
