"""``edgeward harden``: adversarial fine-tuning, distillation, pruning and quantization from a PyTorch source."""

from __future__ import annotations

from pathlib import Path

import typer

from hardening.cli.common import JSON_OPT, console, handle_errors, print_json, table


def register(app: typer.Typer, audit: typer.Typer) -> None:
    app.command("harden")(harden_cmd)


@handle_errors
def harden_cmd(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    torch_source: Path = typer.Option(..., "--torch-source", help="The model's PyTorch source: a state dict of a "
                                      "hardening/zoo.py or reference architecture with its .json sidecar, or TorchScript "
                                      "of a reference architecture (MobileNetV3-small, ResNet-18)."),
    data: Path = typer.Option(..., "--data", help=".npz with x, y (evaluation) and x_train, y_train (training)."),
    recipe: str = typer.Option(..., "--recipe", help="Comma-separated: adv_pgd, trades, distill, adv_distill, prune_structured, int4, ptq, "
                          "qat, mixed."),
    out: Path = typer.Option(..., "--out", help="Folder for the variants, their sources and variants.json."),
    profile: str = typer.Option("quick", "--profile", help="quick (seconds on the demo), thorough (longer training) or large "
                            "(CPU budgets for MobileNet/ResNet-class models)."),
    eps: float = typer.Option(None, "--eps", help="L-inf budget of the adversarial recipes, in input units "
                              "(default 10% of the data range)."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation, batch order and PGD starts."),
    quant_bits: str = typer.Option("w4a8", "--quant-bits", help="Weight/activation bits of ptq, qat and mixed: "
                                   "w8a8, w4a8 or w4a4."),
    json_out: bool = JSON_OPT,
) -> None:
    """Make harder or smaller variants of a float model; audit them with `edgeward audit robustness OUT/variants.json`."""
    from hardening.harden import harden

    with console.status("hardening") as status:
        variants = harden(model, torch_source, data, recipe, out, profile=profile, eps=eps, seed=seed,
                          quant_bits=quant_bits,
                          progress=lambda name: status.update(f"hardening: {name}"))
    if json_out:
        print_json([v.to_dict() for v in variants])
    else:
        table("hardened variants", ["name", "path", "size (KiB)", "parameters", "accuracy", "train s"], [
            (v.name, v.path, Path(v.path).stat().st_size / 1024, v.recipe.get("parameters"), v.recipe.get("accuracy"),
             v.recipe.get("train_seconds")) for v in variants
        ])
