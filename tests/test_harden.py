"""``edgeward harden`` on the digits demo: each recipe's variant, judged by the masking-safe
robustness audit (``run_robustness_audit`` on the produced variants.json) and by profiling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hardening.cli import app

QUICK = "adv_pgd,trades,distill,prune_structured,int4"
EPS = 0.1  # L-inf, digits inputs are in [0, 1]
runner = CliRunner()


@pytest.fixture(scope="module")
def hardened(digits_demo, tmp_path_factory):
    from hardening.harden import harden

    out = tmp_path_factory.mktemp("hardened")
    variants = harden(digits_demo.model_path, digits_demo.torch_path, digits_demo.data_path, QUICK, out, seed=0)
    return out, {v.name: v for v in variants}


@pytest.fixture(scope="module")
def audit(hardened, digits_demo):
    from hardening.robustness import run_robustness_audit

    out, _ = hardened
    rep = run_robustness_audit([str(out / "variants.json")], digits_demo.data_path, eps=[EPS], n=200, seed=0)
    return rep, {v.name: v for v in rep.variants}


def _robust(v) -> float:
    (e,) = v.eps
    return round(e.robust_accuracy, 6)  # robust points / n, without float noise at the threshold


def test_variants_json_is_what_compress_writes_and_every_source_reloads(hardened, digits_demo):
    from hardening.compression import load_variants
    from hardening.intake import load_model
    from hardening.torch_source import load_torch_source

    out, by_name = hardened
    rows = json.loads((out / "variants.json").read_text())
    assert [r["name"] for r in rows] == ["float", *QUICK.split(",")]
    for r in rows:  # stored relative to the file's folder, like compress
        assert not Path(r["path"]).is_absolute() and not Path(r["torch_source"]).is_absolute(), r
        assert r["parent"] == (None if r["name"] == "float" else "float")
    for v in load_variants(out / "variants.json"):
        load_model(v.path)
        assert Path(v.torch_source).with_suffix(".json").is_file()
        load_torch_source(v.torch_source)  # a zoo state dict, weights_only=True
    adv = by_name["adv_pgd"].recipe
    assert adv["eps"] == pytest.approx(EPS) and adv["norm"] == "inf" and adv["pgd_steps"] >= 7
    assert {"epochs", "seed", "lr", "clean_loss_weight", "train_eps"} <= adv.keys()
    dist = by_name["distill"].recipe
    assert {"temperature", "soft_loss_weight", "hard_loss_weight", "student_kwargs", "epochs", "seed"} <= dist.keys()
    assert by_name["prune_structured"].recipe["pruning_ratio"] == 0.5


def test_adversarial_fine_tuning_gains_robust_accuracy_without_losing_clean(audit, hardened):
    rep, v = audit
    assert rep.n == 200 and rep.eps == [EPS]
    for name in ("float", "adv_pgd", "trades"):  # white-box on its own source, no masking flagged
        assert v[name].role == "white-box" and not v[name].upper_bound, (name, v[name].upper_bound_reason)
    assert not [f for f in rep.findings if f.severity == "high"], rep.findings
    gain = _robust(v["adv_pgd"]) - _robust(v["float"])
    assert gain >= 0.20, (_robust(v["float"]), _robust(v["adv_pgd"]))
    assert v["float"].clean_accuracy - v["adv_pgd"].clean_accuracy <= 0.02
    _, by_name = hardened
    rec = by_name["adv_pgd"].recipe  # the whole evaluation split, onnxruntime
    assert rec["parent_accuracy"] - rec["accuracy"] <= 0.02
    assert _robust(v["trades"]) - _robust(v["float"]) >= 0.15  # measured +0.18


def test_int8_of_the_adversarial_variant_keeps_the_gain(hardened, audit, digits_demo, tmp_path):
    from hardening.compression import compress
    from hardening.robustness import run_robustness_audit

    _, by_name = hardened
    _, v = audit
    adv = by_name["adv_pgd"]
    compress(adv.path, digits_demo.data_path, tmp_path, torch_source=adv.torch_source, kinds=("float", "int8_static"))
    rep = run_robustness_audit([str(tmp_path / "variants.json")], digits_demo.data_path, eps=[EPS], n=200, seed=0)
    q = {r.name: r for r in rep.variants}["int8_static"]
    assert q.role == "compressed" and "bpda" in q.families and not q.upper_bound, q.upper_bound_reason
    assert _robust(q) >= _robust(v["adv_pgd"]) - 0.03, (_robust(q), _robust(v["adv_pgd"]))


def test_distilled_student_has_half_the_parameters_and_keeps_accuracy(hardened):
    _, by_name = hardened
    teacher, student = by_name["float"].recipe, by_name["distill"].recipe
    assert 2 * student["parameters"] <= teacher["parameters"]
    assert student["student_parameters"] == student["parameters"]
    assert teacher["accuracy"] - student["accuracy"] <= 0.015, (teacher["accuracy"], student["accuracy"])


def test_structured_pruning_shrinks_the_file_and_the_latency(hardened, digits_demo):
    from hardening.data import load_dataset
    from hardening.profiling import profile_variants

    out, by_name = hardened
    float_size = Path(by_name["float"].path).stat().st_size
    pruned = by_name["prune_structured"]
    assert float_size / Path(pruned.path).stat().st_size >= 1.5
    assert pruned.recipe["parameters_after"] < pruned.recipe["parameters_before"]
    assert by_name["float"].recipe["accuracy"] - pruned.recipe["accuracy"] <= 0.03
    rep = profile_variants([by_name["float"], pruned], load_dataset(digits_demo.data_path), runs=200, big_batch=32)
    f, p = rep.variants
    assert p.size_bytes * 1.5 <= f.size_bytes
    assert p.latency[1].p50_ms < f.latency[1].p50_ms, (f.latency, p.latency)  # batch 32: fc is 4x smaller


def test_cli_writes_variants_that_audit_robustness_reads(digits_demo, tmp_path):
    out = tmp_path / "h"
    r = runner.invoke(app, ["harden", digits_demo.model_path, "--torch-source", digits_demo.torch_path, "--data",
                            digits_demo.data_path, "--recipe", "prune_structured", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [v["name"] for v in rows] == ["float", "prune_structured"]
    r = runner.invoke(app, ["audit", "robustness", str(out / "variants.json"), "--data", digits_demo.data_path,
                            "--n", "16", "--eps", "0.1", "--attacks", "pgd,square", "--json"])
    assert r.exit_code == 0, r.output
    assert [v["name"] for v in json.loads(r.stdout)["variants"]] == ["float", "prune_structured"]


def _one_line_exit_2(argv):
    r = runner.invoke(app, argv)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_cli_errors_are_one_line_exit_2(digits_demo, tmp_path):
    base = ["harden", digits_demo.model_path, "--data", digits_demo.data_path, "--out", str(tmp_path / "o")]
    src = ["--torch-source", digits_demo.torch_path]
    assert "unknown recipe(s) nope" in _one_line_exit_2([*base, *src, "--recipe", "adv_pgd,nope"])
    assert "not found" in _one_line_exit_2([*base, "--torch-source", str(tmp_path / "none.pt"), "--recipe", "distill"])
    assert "--eps" in _one_line_exit_2([*base, *src, "--recipe", "adv_pgd", "--eps", "5"])
    assert "profile" in _one_line_exit_2([*base, *src, "--recipe", "adv_pgd", "--profile", "fast"])
    import torch

    from hardening.zoo import DigitsCNN, LogitsOnly

    script = tmp_path / "script.pt"
    torch.jit.trace(LogitsOnly(DigitsCNN()).eval(), torch.zeros(1, 1, 8, 8)).save(str(script))
    assert "TorchScript" in _one_line_exit_2([*base, "--torch-source", str(script), "--recipe", "distill"])
    other = tmp_path / "other.pt"  # a zoo state dict, but not this model's weights
    from hardening.torch_source import save_state_dict

    save_state_dict(DigitsCNN(num_classes=6), other, "digits_cnn", {"num_classes": 6})
    assert "differ" in _one_line_exit_2([*base, "--torch-source", str(other), "--recipe", "distill"])
    from hardening.data import load_dataset, save_dataset

    ds = load_dataset(digits_demo.data_path)
    ds.x_train = ds.y_train = None
    save_dataset(tmp_path / "eval_only.npz", ds)
    argv = ["harden", digits_demo.model_path, *src, "--data", str(tmp_path / "eval_only.npz"), "--recipe", "distill",
            "--out", str(tmp_path / "o")]
    assert "x_train" in _one_line_exit_2(argv)


def test_int4_weight_only_keeps_accuracy_and_is_audited_through_its_parent(hardened, audit):
    import onnx

    out, by_name = hardened
    v4 = by_name["int4"]
    assert v4.recipe["bits"] == 4 and v4.recipe["block_size"] == 32 and v4.recipe["quantized_nodes"] >= 1
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in onnx.load(v4.path).graph.node)
    assert Path(v4.torch_source).resolve() == (out / "float.pt").resolve()  # the parent's source, like compress
    assert by_name["float"].recipe["accuracy"] - v4.recipe["accuracy"] <= 0.01
    assert Path(v4.path).stat().st_size * 4 <= Path(by_name["float"].path).stat().st_size
    rep, v = audit
    assert v["int4"].role == "compressed" and "bpda" in v["int4"].families and not v["int4"].upper_bound


@pytest.mark.slow
def test_thorough_profile_keeps_the_gain(digits_demo, tmp_path):
    from hardening.harden import harden
    from hardening.robustness import run_robustness_audit

    vs = harden(digits_demo.model_path, digits_demo.torch_path, digits_demo.data_path, QUICK, tmp_path,
                profile="thorough", seed=1)
    rep = run_robustness_audit([str(tmp_path / "variants.json")], digits_demo.data_path, eps=[EPS], n=200,
                               seed=0, profile="thorough")
    v = {r.name: r for r in rep.variants}
    assert _robust(v["adv_pgd"]) - _robust(v["float"]) >= 0.20
    assert v["float"].clean_accuracy - v["adv_pgd"].clean_accuracy <= 0.02
    rec = {x.name: x.recipe for x in vs}
    assert rec["float"]["accuracy"] - rec["distill"]["accuracy"] <= 0.015
    assert np.isclose(rec["adv_pgd"]["eps"], EPS)
