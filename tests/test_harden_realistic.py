"""``edgeward harden`` on what users bring beyond the zoo: a TorchScript MobileNetV3-small
(``hardening/reference_models.py``) is rebuilt as the eager network it was traced from, and
the recipes that need real layers (channel pruning, fake quantization, a half-width
student) run on it. Small inputs here; the 3x96x96 figures are the slow test and
``benchmarks/bench_harden_realistic.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hardening.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_mobilenet(tmp_path_factory):
    from hardening.reference_models import build_reference

    return build_reference("mobilenet_v3_small", tmp_path_factory.mktemp("mnv3"), size=16, channels=3, epochs=1)


def test_torchscript_of_a_reference_network_is_rebuilt_with_the_same_outputs(tmp_path):
    from hardening.harden.source import load_source
    from hardening.reference_models import MobileNetV3Small

    torch.manual_seed(0)
    ts = tmp_path / "model.ts"
    torch.jit.trace(MobileNetV3Small(num_classes=10, in_channels=3).eval(), torch.zeros(1, 3, 16, 16)).save(str(ts))
    src = load_source(ts)
    assert src.torchscript and src.arch == "mobilenet_v3_small"
    assert src.kwargs == {"num_classes": 10, "in_channels": 3, "width_mult": 1.0}
    assert type(src.module) is MobileNetV3Small  # real layers: prunable, fake-quantizable
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(src.module(x).numpy(), torch.jit.load(str(ts))(x).numpy(), atol=1e-5)


def test_half_width_state_dict_and_torchscript_load_without_being_told_the_width(tmp_path):
    from hardening.harden.source import load_source
    from hardening.reference_models import MobileNetV3Small

    m = MobileNetV3Small(num_classes=4, in_channels=2, width_mult=0.5).eval()
    torch.save(m.state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps({"arch": "mobilenet_v3_small"}))
    torch.jit.trace(m, torch.zeros(1, 2, 16, 16)).save(str(tmp_path / "m.ts"))
    for p in (tmp_path / "m.pt", tmp_path / "m.ts"):
        src = load_source(p)
        assert src.kwargs == {"num_classes": 4, "in_channels": 2, "width_mult": 0.5}, p
        x = torch.rand(3, 2, 16, 16)
        with torch.no_grad():
            np.testing.assert_allclose(src.module(x).numpy(), m(x).numpy(), atol=1e-6)


def test_torchscript_of_an_unknown_network_is_refused_in_one_line(tmp_path):
    class Other(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    ts = tmp_path / "other.ts"
    torch.jit.trace(Other().eval(), torch.zeros(1, 3, 16, 16)).save(str(ts))
    r = runner.invoke(app, ["harden", str(tmp_path / "model.onnx"), "--torch-source", str(ts), "--data",
                            str(tmp_path / "data.npz"), "--recipe", "ptq", "--out", str(tmp_path / "o")])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "TorchScript Other cannot be retrained" in lines[0], r.output


@pytest.mark.slow
def test_pruning_a_torchscript_mobilenet_removes_channels_and_keeps_the_input_name(tiny_mobilenet, tmp_path):
    from hardening.compression import load_variants
    from hardening.intake import load_model
    from hardening.reference_models import INPUT_NAME
    from hardening.torch_source import load_torch_source

    r = runner.invoke(app, ["harden", tiny_mobilenet.model_path, "--torch-source", tiny_mobilenet.torchscript_path,
                            "--data", tiny_mobilenet.data_path, "--recipe", "prune_structured,distill",
                            "--profile", "large", "--out", str(tmp_path / "h"), "--json"])
    assert r.exit_code == 0, r.output
    by = {v.name: v for v in load_variants(tmp_path / "h" / "variants.json")}
    f, p, d = by["float"], by["prune_structured"], by["distill"]
    assert Path(f.torch_source).read_bytes() == Path(tiny_mobilenet.torchscript_path).read_bytes()
    assert p.recipe["source_format"] == "torchscript" and p.recipe["ignored_layers"] == ["classifier.3"]
    assert p.recipe["parameters_after"] < 0.5 * p.recipe["parameters_before"]
    assert Path(p.path).stat().st_size * 1.5 < Path(f.path).stat().st_size  # channels gone, not zeroed
    assert d.recipe["student_arch"] == "mobilenet_v3_small" and d.recipe["student_kwargs"]["width_mult"] == 0.5
    assert 2 * d.recipe["student_parameters"] <= d.recipe["teacher_parameters"]
    for v in (p, d):
        assert load_model(v.path).input_name == INPUT_NAME  # the parent's input name, so callers need no change
        module = load_torch_source(v.torch_source)  # TorchScript: irregular pruned widths survive
        x = torch.rand(2, 3, 16, 16)
        assert module(x).shape == (2, 10)


@pytest.mark.slow
def test_recipes_on_mobilenet_v3_small_at_3x96x96(tmp_path_factory):
    """The realistic model: every recipe family at ``--profile large`` on MobileNetV3-small
    (3x96x96, TorchScript source). Structure, accuracy and trusted (not upper-bound) robust
    figures; speed is the benchmark's, and so is the finding that this CPU budget buys no
    robustness at L-inf 0.1 here (BENCHMARKS.md)."""
    from hardening.harden import harden
    from hardening.reference_models import build_reference
    from hardening.robustness import run_robustness_audit

    ref = build_reference("mobilenet_v3_small", tmp_path_factory.mktemp("ref"), size=96)
    assert ref.test_accuracy >= 0.9
    out = tmp_path_factory.mktemp("hardened")
    vs = {v.name: v for v in harden(ref.model_path, ref.torchscript_path, ref.data_path,
                                      "adv_pgd,distill,prune_structured,ptq,qat", out, profile="large",
                                      quant_bits="w8a8")}
    f = vs["float"].recipe
    for name in ("distill", "prune_structured", "ptq", "qat"):
        assert vs[name].recipe["accuracy"] >= f["accuracy"] - 0.05, (name, vs[name].recipe["accuracy"])
    p = vs["prune_structured"].recipe
    assert p["size_bytes"] * 1.5 <= p["parent_size_bytes"] and p["parameters_after"] * 2 <= p["parameters_before"]
    assert vs["distill"].recipe["parameter_ratio"] <= 0.5
    assert vs["ptq"].recipe["size_bytes"] * 2.5 <= f["size_bytes"]
    rep = run_robustness_audit([str(out / "variants.json")], ref.data_path, eps=[0.1], n=40, seed=0,
                               attacks=["fgsm", "pgd", "apgd-ce", "square"])
    rob = {v.name: v for v in rep.variants}
    for name in ("float", "adv_pgd", "prune_structured", "ptq"):
        assert not rob[name].upper_bound, name
        assert rob[name].robust_at(0.1).robust_accuracy <= rob[name].clean_accuracy
