"""The recipes ``edgeward harden --recipe`` knows, by name, and the family module of each."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hardening.errors import InputError


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    summary: str
    run: Callable  # (Context) -> Result; onnx_level: (Context, float_onnx, dst) -> recipe dict
    onnx_level: bool = False  # works on the float ONNX graph; the source stays the parent's
    post: Callable | None = None  # (Context, Result, float export, dst) -> recipe dict: writes the variant's ONNX


def _recipes() -> dict[str, Recipe]:
    from hardening.harden import adversarial, distillation, lowbit, pruning, pt2e, quantization

    return {r.name: r for r in (
        Recipe("adv_pgd", "adversarial", "PGD adversarial fine-tuning (L-inf) from the source's weights", adversarial.adv_pgd),
        Recipe("trades", "adversarial", "TRADES fine-tuning (L-inf) from the source's weights", adversarial.trades),
        Recipe("distill", "distillation", "knowledge distillation into a half-width student", distillation.distill),
        Recipe("adv_distill", "distillation", "adversarially robust distillation (ARD) into a half-width student",
               distillation.adv_distill),
        Recipe("prune_structured", "pruning", "torch-pruning channel removal + fine-tuning", pruning.prune_structured),
        Recipe("int4", "low-bit", "4-bit weight-only MatMulNBits (onnxruntime)", lowbit.int4, onnx_level=True),
        Recipe("ptq", "quantization", "post-training static QDQ at --quant-bits (onnxruntime)", quantization.ptq,
               onnx_level=True),
        Recipe("qat", "quantization", "quantization-aware fine-tuning, QDQ at --quant-bits", quantization.qat,
               post=quantization.qat_export),
        Recipe("qat_pt2e", "quantization", "quantization-aware fine-tuning in torch's PT2E flow (torchao), "
               "int8 QDQ written by torch.onnx", pt2e.qat_pt2e, post=pt2e.export_qdq),
        Recipe("mixed", "quantization", "QDQ at --quant-bits, most sensitive nodes kept in float", quantization.mixed,
               onnx_level=True),
    )}


RECIPE_NAMES = ("adv_pgd", "trades", "distill", "adv_distill", "prune_structured", "int4", "ptq", "qat", "qat_pt2e",
                "mixed")


def parse_recipes(text: str) -> list[Recipe]:
    """``adv_pgd,distill`` -> recipes, in the order given, each once."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise InputError(f"no recipe given; choose from {', '.join(RECIPE_NAMES)}")
    unknown = [n for n in names if n not in RECIPE_NAMES]
    if unknown:
        raise InputError(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPE_NAMES)}")
    known = _recipes()
    return [known[n] for n in dict.fromkeys(names)]
