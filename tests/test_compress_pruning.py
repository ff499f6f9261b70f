"""Issue 15 item 2: `compress` prunes through harden's recipes when the source can be trained
(fine-tuned, structured pruning physically smaller), within a time cap, and a pruned variant
that still loses too much accuracy is skipped with its reason instead of offered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from hardening.cli import app
from hardening.compression import load_variants, skipped_variants
from hardening.harden.base import train_loop
from hardening.intake import load_model, make_session
from hardening.torch_source import load_torch_source


def _acc(path, x, y) -> float:
    info = load_model(path)
    return float((make_session(path).run([info.logits_output], {info.input_name: x})[0].argmax(1) == y).mean())


def _conv_out_channels(path) -> list[int]:
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    return [int(inits[n.input[1]].dims[0]) for n in m.graph.node if n.op_type == "Conv" and n.input[1] in inits]


def test_pruned_variants_of_a_trainable_source_are_fine_tuned_and_within_tolerance(digits_variants, digits_demo):
    by = {v.kind: v for v in digits_variants}
    with np.load(digits_demo.data_path, allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    float_acc = _acc(by["float"].path, x, y)
    for kind in ("pruned_unstructured", "pruned_structured"):
        v, r = by[kind], by[kind].recipe
        assert r["path"].startswith("fine-tuned from the PyTorch source"), r["path"]
        assert float_acc - _acc(v.path, x, y) <= 0.03, kind  # a candidate, not a 10% variant
        h = r["heldout"]
        assert h["split"] == "x_cal" and h["drop"] <= h["max_drop"] == 0.03
        assert h["accuracy_before_fine_tune"] is not None and h["accuracy_recovered"] == pytest.approx(
            h["accuracy"] - h["accuracy_before_fine_tune"])
        ft = r["fine_tune"]
        assert max(1, ft["min_epochs"]) <= ft["epochs_completed"] <= ft["epochs_budget"] and ft["max_seconds"] == 25.0
        assert ft["seconds"] > 0 and ft["stopped_by"] in ("epochs", "time budget") and r["seconds"] >= ft["seconds"]
        # its own PyTorch source (white-box attacks hit the pruned weights), reloadable, same logits
        assert Path(v.torch_source).name == f"{kind}.pt"
        src = load_torch_source(v.torch_source)
        with torch.no_grad():
            t = src(torch.from_numpy(x[:32]))
        t = (t[0] if isinstance(t, (tuple, list)) else t).numpy()
        np.testing.assert_allclose(t, make_session(v.path).run(["logits"], {"input": x[:32]})[0], atol=1e-3, rtol=1e-3)
    s = by["pruned_structured"].recipe
    assert s["physically_smaller"] is True and s["pruning_ratio"] == 0.3
    assert s["parameters_after"] < 0.8 * s["parameters_before"]
    assert Path(by["pruned_structured"].path).stat().st_size < 0.8 * Path(by["float"].path).stat().st_size
    head_in = _conv_out_channels(by["float"].path), _conv_out_channels(by["pruned_structured"].path)
    assert all(p < f for f, p in zip(*head_in)), head_in  # fewer channels in every conv
    u = by["pruned_unstructured"].recipe
    assert u["physically_smaller"] is False and u["achieved_weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    w = [numpy_helper.to_array(i) for i in onnx.load(by["pruned_unstructured"].path).graph.initializer
         if i.name.endswith("weight")]
    assert sum(int((a == 0).sum()) for a in w) / sum(a.size for a in w) == pytest.approx(0.5, abs=0.02)
    rows = {r["name"]: r for r in json.loads((Path(by["float"].path).parent / "variants.json").read_text())}
    assert rows["pruned_structured"]["recipe"]["fine_tune"] == s["fine_tune"]  # variants.json says what happened


def test_fine_tuning_that_cannot_recover_is_skipped_and_the_cli_says_why(digits_demo, tmp_path):
    # labels = the float model's predictions: float is exact on x_cal, so at tolerance 0 any change is a drop
    arrays = dict(np.load(digits_demo.data_path, allow_pickle=False))
    info = load_model(digits_demo.model_path)
    arrays["y_cal"] = make_session(digits_demo.model_path).run(None, {info.input_name: arrays["x_cal"]})[0].argmax(1)
    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    out = tmp_path / "v"
    r = CliRunner().invoke(app, ["compress", digits_demo.model_path, "--data", str(data), "--out", str(out),
                                 "--torch-source", digits_demo.torch_path, "--variants", "float,pruned_structured",
                                 "--channel-ratio", "0.75", "--max-accuracy-drop", "0", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["float", "pruned_structured"] and rows[1]["path"] is None
    assert "after pruning at 0.75" in rows[1]["skipped"] and "a drop above 0" in rows[1]["skipped"]
    assert rows[1]["recipe"]["heldout"]["drop"] > 0 and rows[1]["recipe"]["fine_tune"]["epochs_completed"] >= 1
    assert skipped_variants(out / "variants.json") == rows[1:]
    assert [v.kind for v in load_variants(out / "variants.json")] == ["float"]
    assert not list(out.glob("pruned_structured*"))  # nothing left that looks like a candidate


def test_the_training_loop_cuts_epochs_to_its_time_cap():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    b = {"epochs": 5, "batch": 16, "lr_schedule": "cosine"}

    def run(extra: dict):
        model = nn.Linear(4, 2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return train_loop(model, opt, x, y, {**b, **extra}, torch.Generator().manual_seed(0),
                          lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb))

    free = run({})
    assert (free.epochs_completed, free.steps, free.stopped_by) == (5, 20, "epochs")
    capped = run({"max_seconds": 0.0})  # no time at all: one epoch, never zero
    assert (capped.epochs_planned, capped.epochs_completed, capped.steps) == (1, 1, 4)
    assert capped.stopped_by == "time budget" and capped.max_seconds == 0.0
    floored = run({"max_seconds": 0.0, "min_epochs": 3})  # a loaded machine never cuts below min_epochs
    assert (floored.epochs_planned, floored.epochs_completed, floored.stopped_by) == (3, 3, "time budget")
    roomy = run({"max_seconds": 60.0})
    assert (roomy.epochs_completed, roomy.stopped_by) == (5, "epochs")


@pytest.mark.slow
def test_mobilenet_torchscript_gets_a_fine_tuned_physically_smaller_pruned_variant(tmp_path):
    """The realistic case of the issue: MobileNetV3-small 3x96x96 with its TorchScript source
    (main's untuned ONNX-level variant: 9.7% accuracy)."""
    from hardening.compression import compress
    from hardening.reference_models import build_reference

    ref = build_reference("mobilenet_v3_small", tmp_path / "ref", size=96)
    vs = compress(ref.model_path, ref.data_path, tmp_path / "v", torch_source=ref.torchscript_path,
                  kinds=("float", "pruned_structured"))
    by = {v.kind: v for v in vs}
    if "pruned_structured" not in by:  # a loaded machine may leave too few epochs: then it must say so
        (row,) = skipped_variants(tmp_path / "v" / "variants.json")
        assert row["recipe"]["fine_tune"]["stopped_by"] == "time budget", row
        return
    r = by["pruned_structured"].recipe
    with np.load(ref.data_path, allow_pickle=False) as z:
        x, y = z["x"], z["y"]
    assert _acc(by["float"].path, x, y) - _acc(by["pruned_structured"].path, x, y) <= 0.05
    assert r["physically_smaller"] and r["parameters_after"] < 0.7 * r["parameters_before"]
