"""Evasion through the anomaly gate by attackers who know it (issue #16 item 1).

The torch copy of the gate must reproduce the runtime scorer on real inputs, so a later
change to the runtime's detectors or fusion fails here instead of silently diverging.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from attacks.gate_torch import GateCopyError, GuardedTorch, TorchGate, check_copy
from hardening.cli import app
from hardening.data import load_dataset
from hardening.ood import fit_ood
from hardening.ood.families import synthetic_families
from hardening.torch_source import load_torch_source
from runtime_guard.anomaly import AnomalyScorer


@pytest.fixture(scope="module")
def gate(digits_demo, tmp_path_factory):
    det = tmp_path_factory.mktemp("adaptive_det")
    fit_ood(digits_demo.model_path, digits_demo.data_path, det, alpha=0.05)
    return det


def _outputs(model_path, x):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    lg, ft = sess.run(["logits", "features"], {"input": np.ascontiguousarray(x, np.float32)})
    return lg, ft


@pytest.mark.parametrize("rule", ["fitted", "mean_z", "max_z"])
def test_torch_gate_reproduces_the_runtime_fused_score(digits_demo, gate, rule):
    ds = load_dataset(digits_demo.data_path)
    scorer = AnomalyScorer.load(gate)
    if rule != "fitted":  # the same detectors under every fusion rule the runtime reads
        meta = json.loads(json.dumps(scorer.meta))
        meta["fusion"]["rule"] = rule
        scorer = AnomalyScorer.from_bytes(scorer.npz_bytes, meta)
    guarded = GuardedTorch(load_torch_source(digits_demo.torch_path), TorchGate(scorer))
    fams = synthetic_families(ds, n=64, seed=1)
    # in-distribution, held-out digits, noise, natural patches, inverted: both sides of the threshold
    for x in (ds.x, ds.ood["heldout"], fams["uniform"], fams["patches"], fams["inverted"]):
        lg, ft = _outputs(digits_demo.model_path, x)
        chk = check_copy(guarded, scorer, x, lg, ft)
        assert chk.ok and chk.max_abs_error < 1e-4, chk
        assert chk.decisions_agree == 1.0, chk


def test_unknown_fusion_rule_is_refused_not_approximated(gate):
    scorer = AnomalyScorer.load(gate)
    scorer.rule = "median_z"  # a rule some later runtime might add: the copy must not guess
    with pytest.raises(GateCopyError, match="median_z"):
        TorchGate(scorer)


def test_adaptive_attack_finds_at_least_plain_pgd_then_gate(digits_demo, gate):
    res = CliRunner().invoke(app, [
        "audit", "robustness", str(digits_demo.model_path), "--data", str(digits_demo.data_path),
        "--torch-source", str(digits_demo.torch_path), "--n", "8", "--attacks", "fgsm", "--eps", "0.2",
        "--detectors", str(gate), "--guarded-n", "24", "--json"])
    assert res.exit_code == 0, res.output
    g = json.loads(res.stdout)["guarded"][0]
    assert g["gate_copy"]["ok"] and g["gate_copy"]["source"] == "torch source"
    assert g["white_box_skipped"] is None
    e = g["result"]["eps"][0]
    assert e["found_adaptive"] >= e["found_plain_pgd_then_gate"] > 0
    assert e["bare_robust_accuracy"] <= e["guarded_robust_accuracy"] <= e["non_adaptive_guarded_accuracy"]
    assert set(e["found_by"]) == {"white-box", "score", "decision"}


def test_detectors_need_exactly_one_model(digits_demo, gate):
    res = CliRunner().invoke(app, [
        "audit", "robustness", str(digits_demo.model_path), str(digits_demo.model_path), "--data",
        str(digits_demo.data_path), "--n", "4", "--attacks", "fgsm", "--eps", "0.1", "--no-self-checks",
        "--detectors", str(gate)])
    assert res.exit_code == 2, res.output
    assert "exactly one model" in res.output
