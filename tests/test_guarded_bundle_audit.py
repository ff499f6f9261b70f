"""``audit robustness --guarded BUNDLE``: the adaptive evasion audit through the gate a signed
bundle ships (issue #16 item 7), and its multi-seed summary."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hardening.cli import app

from api_fixtures import api_env  # noqa: F401


def _bundle(api_env, digits_demo, gate, path, action):  # noqa: F811
    from hardening.data import load_dataset
    from hardening.intake import load_model
    from hardening.packaging import runtime_config
    from runtime_guard.bundle import write_bundle

    meta = json.loads((gate / "detectors.json").read_text())
    npz = (gate / "detectors.npz").read_bytes()
    runtime = runtime_config(load_model(digits_demo.model_path), load_dataset(digits_demo.data_path), meta,
                             gate_action=action, detector_npz=npz)
    write_bundle(path, {"model": api_env.model_bytes, "detectors.npz": npz},
                 {"model": {"name": "digits"}, "runtime": runtime, "smoke_test": api_env.golden()},
                 api_env.signing_key, api_env.kek, 1)
    return path


@pytest.fixture(scope="module")
def gate(digits_demo, tmp_path_factory):
    from hardening.ood import fit_ood

    det = tmp_path_factory.mktemp("bundle_gate")
    fit_ood(digits_demo.model_path, digits_demo.data_path, det, alpha=0.05)
    return det


def _audit(digits_demo, *extra):
    res = CliRunner().invoke(app, [
        "audit", "robustness", str(digits_demo.model_path), "--data", str(digits_demo.data_path),
        "--torch-source", str(digits_demo.torch_path), "--n", "4", "--attacks", "fgsm", "--eps", "0.2",
        "--no-self-checks", "--guarded-n", "12", "--json", *extra])
    return res


def test_guarded_bundle_gives_the_same_figures_as_its_detectors(api_env, digits_demo, gate, tmp_path):  # noqa: F811
    bundle = _bundle(api_env, digits_demo, gate, tmp_path / "g.ewb", "reject")
    keys = ["--public-key", str(api_env.public_key_path), "--key-file", str(api_env.kek_path)]
    via_bundle = _audit(digits_demo, "--guarded", str(bundle), *keys, "--guarded-seeds", "2")
    via_dir = _audit(digits_demo, "--detectors", str(gate))
    assert via_bundle.exit_code == 0, via_bundle.output
    assert via_dir.exit_code == 0, via_dir.output
    b, d = json.loads(via_bundle.stdout), json.loads(via_dir.stdout)
    assert b["guarded"][0]["bundle"]["gate_action"] == "reject"
    assert b["guarded"][0]["result"]["eps"] == d["guarded"][0]["result"]["eps"]  # same gate, same seed
    s = b["guarded_seeds"]
    assert s["seeds"] == [0, 1] and len(b["guarded"]) == 2
    e = s["eps"][0]["guarded_robust_accuracy"]
    assert len(e["per_seed"]) == 2 and e["min"] <= e["mean"] <= e["max"]
    assert e["per_seed"][0] == pytest.approx(d["guarded"][0]["result"]["eps"][0]["guarded_robust_accuracy"])


@pytest.mark.slow
def test_a_flag_only_gate_is_judged_as_answering_everything(api_env, digits_demo, gate, tmp_path):  # noqa: F811
    bundle = _bundle(api_env, digits_demo, gate, tmp_path / "f.ewb", "flag")
    res = _audit(digits_demo, "--guarded", str(bundle), "--public-key", str(api_env.public_key_path),
                 "--key-file", str(api_env.kek_path))
    assert res.exit_code == 0, res.output
    g = json.loads(res.stdout)["guarded"][0]
    assert "stops no evasion" in g["bundle"]["note"]
    assert g["result"]["clean_accepted"] == 1.0


def test_guarded_bundle_needs_its_keys_and_refuses_both_sources(digits_demo, gate, tmp_path):
    res = _audit(digits_demo, "--guarded", str(tmp_path / "x.ewb"))
    assert res.exit_code == 2 and "--public-key" in res.output
    res = _audit(digits_demo, "--guarded", str(tmp_path / "x.ewb"), "--detectors", str(gate))
    assert res.exit_code == 2 and "not both" in res.output
