"""``edgeward demo-model``, ``compress`` and ``profile``."""

from __future__ import annotations

from pathlib import Path

import typer

from hardening.cli.common import JSON_OPT, console, handle_errors, print_json, table


def register(app: typer.Typer, audit: typer.Typer) -> None:
    app.command("demo-model")(demo_model)
    app.command("compress")(compress_cmd)
    app.command("profile")(profile_cmd)


@handle_errors
def demo_model(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder; each demo goes in OUT/<name>/."),
    name: list[str] = typer.Option(["digits", "tabular"], "--name", help="Demo(s) to build: digits, tabular."),
    seed: int = typer.Option(0, help="Seed for splits, initialisation and training order."),
    epochs: int = typer.Option(30, min=1, help="Training epochs (fewer = a weaker model)."),
    weight_noise: float = typer.Option(0.0, min=0.0, help="Relative Gaussian noise added to weights after training."),
    json_out: bool = JSON_OPT,
) -> None:
    """Train the built-in demo models (seconds, fixed seeds) and export ONNX + data splits."""
    from hardening.demo import build_demo

    arts = []
    with console.status("training demo models"):
        for n in name:
            arts.append(build_demo(n, out / n, seed=seed, epochs=epochs, weight_noise=weight_noise))
    if json_out:
        print_json([a.to_dict() for a in arts])
    else:
        table("demo models", ["name", "model", "data", "test accuracy"], [(a.name, a.model_path, a.data_path, a.test_accuracy) for a in arts])


@handle_errors
def compress_cmd(
    model: Path = typer.Argument(..., help="Float ONNX model."),
    data: Path = typer.Option(..., "--data", help=".npz with x, y and a calibration split (x_cal/y_cal)."),
    out: Path = typer.Option(..., "--out", help="Folder for the variants and variants.json."),
    torch_source: Path = typer.Option(None, "--torch-source", help="PyTorch source: pruning re-exports it "
                                      "(otherwise, or for TorchScript, pruning works on the ONNX graph)."),
    kinds: str = typer.Option(
        None,
        "--variants",
        help="Comma-separated kinds (default: all).",
    ),
    sparsity: float = typer.Option(0.5, help="Unstructured pruning: fraction of weights zeroed, in (0, 1)."),
    channel_ratio: float = typer.Option(0.3, help="Structured pruning: fraction of each layer's channels "
                                        "removed, in (0, 1)."),
    max_accuracy_drop: float = typer.Option(0.03, help="A pruned variant losing more held-out accuracy than this "
                                            "vs float is skipped (recorded in variants.json)."),
    profile: str = typer.Option("quick", help="Fine-tuning budget of pruned variants: quick or thorough."),
    json_out: bool = JSON_OPT,
) -> None:
    """Make int8 static (QDQ), int8 dynamic and pruned variants of a float model.

    Pruned variants are fine-tuned when the PyTorch source can be trained (zoo state dict,
    MobileNetV3/ResNet TorchScript); otherwise weights are zeroed on the ONNX graph at the
    largest sparsity that keeps the held-out accuracy. A variant that cannot is skipped."""
    from hardening.compression import KINDS, compress, skipped_variants

    wanted = KINDS if kinds is None else tuple(k.strip() for k in kinds.split(",") if k.strip())
    with console.status("compressing"):
        variants = compress(model, data, out, torch_source=torch_source, kinds=wanted, sparsity=sparsity,
                            channel_ratio=channel_ratio, max_accuracy_drop=max_accuracy_drop, profile=profile)
    skipped = skipped_variants(out / "variants.json")
    if json_out:
        print_json([v.to_dict() for v in variants] + skipped)  # the rows variants.json records
    else:
        table("variants", ["name", "path", "size (KiB)", "recipe", "what"], [
            (v.name, v.path, Path(v.path).stat().st_size / 1024, v.recipe.get("tool"), v.recipe.get("what", ""))
            for v in variants
        ] + [(s["name"], "-", "-", "skipped", s["skipped"]) for s in skipped])


@handle_errors
def profile_cmd(
    variants: Path = typer.Argument(..., help="variants.json from `edgeward compress`, or one ONNX model."),
    data: Path = typer.Option(..., "--data", help=".npz with x and y."),
    budgets: Path = typer.Option(None, "--budgets", help="TOML file with a [budgets] table."),
    threads: int = typer.Option(1, min=1, help="onnxruntime intra-op threads (recorded)."),
    runs: int = typer.Option(200, min=10, help="Timed runs at batch 1 (a quarter of that at the large batch)."),
    batch: int = typer.Option(32, min=2, help="The larger batch size."),
    json_out: bool = JSON_OPT,
) -> None:
    """Accuracy, agreement, size, latency p50/p95/p99, memory, cold start and energy proxy per variant."""
    from hardening.compression import Variant, load_variants
    from hardening.data import load_dataset
    from hardening.intake import load_model
    from hardening.profiling import Budgets, profile_variants

    if variants.suffix == ".json":
        vs = load_variants(variants)
    else:
        info = load_model(variants)
        vs = [Variant(variants.stem, str(variants), "float", None, {"tool": "given"}, info.sha256)]
    ds = load_dataset(data)
    b = Budgets.from_toml(budgets) if budgets else Budgets()
    with console.status("profiling") as status:
        report = profile_variants(vs, ds, b, threads=threads, runs=runs, big_batch=batch,
                                  progress=lambda n: status.update(f"profiled {n}"))
    if json_out:
        print_json(report.to_dict())
    else:
        table(
            f"profile ({threads} thread(s); energy: {report.variants[0].energy_source})",
            ["variant", "size KiB", "acc", "agree", "p50 b1 ms", "p95 b1", "p99 b1", f"p50 b{batch}",
             "cold ms", "mem MB b1", f"mem b{batch}", "cpu ms/inf", "budgets"],
            [(p.name, p.size_bytes / 1024, p.accuracy, p.agreement_with_float, p.latency[0].p50_ms, p.latency[0].p95_ms,
              p.latency[0].p99_ms, p.latency[1].p50_ms, p.cold_start_ms, p.memory_added_mb, p.memory_by_batch[1].memory_added_mb, p.cpu_ms_per_inference,
              ("PASS" if p.passed else "FAIL") if p.budget_checks else "-") for p in report.variants],
        )
    if not report.passed:
        raise typer.Exit(1)
