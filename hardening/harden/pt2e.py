"""``qat_pt2e``: quantization-aware training through torch's PT2E flow, which torch 2.13
ships only through torchao (``torchao.quantization.pt2e``; extra ``edgeward[pt2e]``).

The float source is captured with ``torch.export`` (dynamic batch), ``prepare_qat_pt2e``
inserts torchao's fake quantizers as ``X86InductorQuantizer``'s QAT config places them (int8
symmetric per-channel weights, uint8 per-tensor activations, conv+BN folded in simulation),
the graph is fine-tuned, ``convert_pt2e`` turns it into quantize/dequantize ops and
``torch.onnx`` writes those as ONNX QuantizeLinear/DequantizeLinear: the QDQ graph is
torch's own, not re-quantized by onnxruntime (unlike ``qat``). The variant's PyTorch source
is the fine-tuned float latent weights in the eager architecture."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from hardening.errors import InputError
from hardening.harden.base import Context, Result, Timer, batches
from hardening.zoo import LogitsOnly


def _torchao():
    try:
        logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels do not load on CPU
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.quantization.pt2e import move_exported_model_to_eval
            from torchao.quantization.pt2e.fake_quantize import disable_observer
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise InputError(f"qat_pt2e needs torchao (pip install 'edgeward[pt2e]'): {e}") from None
    return torchao, prepare_qat_pt2e, convert_pt2e, move_exported_model_to_eval, disable_observer, xiq


def qat_pt2e(ctx: Context) -> Result:
    """Fine-tune under PT2E fake quantization (same budget as ``qat``); int8 only."""
    if ctx.quant_bits != "w8a8":
        raise InputError(f"qat_pt2e: torchao's X86InductorQuantizer quantizes to int8 only (--quant-bits w8a8), "
                         f"not {ctx.quant_bits}")
    torchao, prepare_qat_pt2e, convert_pt2e, to_eval, disable_observer, xiq = _torchao()
    b = ctx.budget("qat")
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher)
    x, y = ctx.x_train, ctx.y_train
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(LogitsOnly(model).train(), (x[: b["batch"]],),
                                    dynamic_shapes=({0: batch},)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
        prepared = prepare_qat_pt2e(graph, quantizer)
    opt = torch.optim.Adam(prepared.parameters(), lr=b["lr"])
    with Timer() as t:
        for epoch in range(b["epochs"]):
            if epoch == b["freeze_observers_after"]:
                prepared.apply(disable_observer)
            for idx in batches(len(x), b["batch"], g):
                opt.zero_grad()
                nn.functional.cross_entropy(prepared(x[idx]), y[idx]).backward()
                opt.step()
    latent = {k.removeprefix("model."): v.detach().clone() for k, v in prepared.state_dict().items()
              if k.startswith("model.")}
    keys = model.state_dict().keys()
    missing = [k for k in keys if k not in latent]
    if missing:
        raise InputError(f"qat_pt2e: the prepared graph lost parameters {missing[:3]} of {ctx.arch}; "
                         "its float weights cannot be written back as the source")
    model.load_state_dict({k: latent[k] for k in keys})
    converted = convert_pt2e(prepared)
    to_eval(converted)
    recipe = {
        "tool": f"torchao {torchao.__version__} PT2E: torch.export + prepare_qat_pt2e + convert_pt2e, "
                "X86InductorQuantizer (QAT config); QDQ ONNX written by torch.onnx",
        "method": "quantization-aware fine-tuning in torch's PT2E flow from the float source's weights",
        "bits": "w8a8", "weights": "int8 [-128, 127] symmetric per channel (fake-quant, moving-average min/max)",
        "activations": "uint8 per tensor (fused moving-average observer + fake-quant)",
        "freeze_observers_after": b["freeze_observers_after"], "epochs": b["epochs"], "batch": b["batch"],
        "optimizer": "Adam", "lr": b["lr"], "init": "float source weights", "train_samples": int(len(x)),
        "seed": ctx.seed, "train_seconds": t.seconds,
    }
    return Result(model.eval(), ctx.arch, dict(ctx.kwargs), recipe, deployed=converted)


def export_qdq(ctx: Context, res: Result, float_export: Path, dst: Path) -> dict:
    """The converted PT2E graph -> ONNX (its quantize/dequantize ops as QDQ), dynamic batch."""
    from hardening.intake import load_model, make_session

    name = load_model(float_export).input_name
    sample = torch.from_numpy(ctx.ds.x[:2])
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(res.deployed, (sample,), input_names=[name], output_names=["logits"],
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), dynamo=True,
                                 external_data=False, opset_version=18, verbose=False)
        prog.save(str(dst), external_data=False)
    sess = make_session(dst)
    x = ctx.ds.x[:32]
    with torch.no_grad():
        ref = res.deployed(torch.from_numpy(x)).numpy()
    agree = float((sess.run(None, {name: x})[0].argmax(1) == ref.argmax(1)).mean())
    if agree < 0.9:
        raise InputError(f"qat_pt2e: onnxruntime's QDQ graph agrees with the converted torch graph on only "
                         f"{agree:.0%} of 32 inputs")
    return {"export": {"tool": "torch.onnx.export (dynamo) of the convert_pt2e graph", "format": "QDQ",
                       "opset": 18, "top1_agreement_with_torch_graph": agree}}
