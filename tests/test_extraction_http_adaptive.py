"""Adaptive thieves over HTTP against a real served guarded bundle (issue #16 item 3).

The bundle is what ``edgeward package`` ships: the digits model, its fitted OOD detectors
(gate rejecting), the PRADA monitor, and a per-client rate limit; the server is a real
``edgeward serve`` process on 127.0.0.1. A patient thief waits out every 429, so it spends
its whole budget under the deployed limit and the wall-clock time is the time to steal.
"""

from __future__ import annotations

import json
import re

import pytest
import requests

from api_fixtures import api_env  # noqa: F401
from servers import ServerProcess


def _count(url: str, status: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    total = 0.0
    for m in re.finditer(r'^edgeward_http_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("method") == "POST" and "predict" in labels.get("endpoint", "") and labels["status"] == status:
            total += float(m.group(2))
    return total


def guarded_bundle(api_env, digits_demo, root, rate: str, extraction: dict):  # noqa: F811
    """A signed bundle with the real fitted gate (reject), the given monitor section and rate."""
    from hardening.data import load_dataset
    from hardening.intake import load_model
    from hardening.ood.pipeline import fit_ood
    from hardening.packaging import runtime_config
    from runtime_guard.bundle import write_bundle

    gate = root / "gate"
    fit_ood(digits_demo.model_path, digits_demo.data_path, gate, alpha=0.05)
    meta = json.loads((gate / "detectors.json").read_text())
    npz = (gate / "detectors.npz").read_bytes()
    runtime = runtime_config(load_model(digits_demo.model_path), load_dataset(digits_demo.data_path), meta,
                             gate_action="reject", rate_limit=rate, overrides={"extraction": extraction},
                             detector_npz=npz)
    path = root / "guarded.ewb"
    write_bundle(path, {"model": api_env.model_bytes, "detectors.npz": npz},
                 {"model": {"name": "digits"}, "runtime": runtime, "smoke_test": api_env.golden()},
                 api_env.signing_key, api_env.kek, 1)
    return path


@pytest.fixture(scope="module")
def guarded_server(api_env, digits_demo, tmp_path_factory):  # noqa: F811
    from api.auth import add_key

    root = tmp_path_factory.mktemp("http_adaptive")
    keys_path = root / "keys.json"
    keys = [add_key(keys_path, f"adaptive{i}") for i in range(3)]
    bundle = guarded_bundle(api_env, digits_demo, root, "40/second", {"enabled": True, "action": "flag"})
    srv = ServerProcess(api_env.serve_args(bundle, "--api-keys", str(keys_path)), root / "server.log").start()
    yield srv, keys
    srv.stop()


def test_patient_gate_aware_jbda_spends_its_budget_under_the_served_limit(guarded_server, digits_demo):
    from hardening.extraction_audit import run_http_extraction

    srv, keys = guarded_server
    before = {s: _count(srv.url, s) for s in ("200", "422", "429")}
    run = run_http_extraction(srv.url, digits_demo.model_path, digits_demo.data_path, keys=keys[:1], budget=120,
                              attack="jbda+gate", torch_source=digits_demo.torch_path, train_steps=30,
                              patience_s=5.0)
    led = run.ledger
    assert led["sent"] == 120 and led["balanced"] and led["rate_limited"] == 0 and led["errors"] == 0
    assert led["rejected"] > 0 and led["answered"] > led["rejected"]  # the gate refuses some; the thief keeps the rest
    assert run.trained_on == led["answered"]
    after = {s: _count(srv.url, s) for s in ("200", "422", "429")}
    assert after["200"] - before["200"] == led["answered"]
    assert after["422"] - before["422"] == led["rejected"]
    assert after["429"] - before["429"] == run.retries  # every wait-out is a real 429 from the server
    assert run.fidelity > 0.3


@pytest.mark.slow
def test_patient_thief_waits_out_a_binding_limit(api_env, digits_demo, tmp_path):  # noqa: F811
    """20/minute and 30 queries: the 21st is refused whatever the machine's speed, and waited out."""
    from api.auth import add_key
    from hardening.extraction_audit import run_http_extraction

    key = add_key(tmp_path / "keys.json", "slow")
    bundle = guarded_bundle(api_env, digits_demo, tmp_path, "20/minute", {"enabled": True, "action": "flag"})
    with ServerProcess(api_env.serve_args(bundle, "--api-keys", str(tmp_path / "keys.json")),
                       tmp_path / "server.log") as srv:
        run = run_http_extraction(srv.url, digits_demo.model_path, digits_demo.data_path, keys=[key], budget=30,
                                  attack="jbda+gate", torch_source=digits_demo.torch_path, train_steps=10,
                                  patience_s=120.0)
        assert _count(srv.url, "429") == run.retries >= 1
    assert run.ledger["sent"] == 30 and run.ledger["rate_limited"] == 0 and run.ledger["balanced"]
    assert run.waited_s > 0 and run.wall_seconds >= run.waited_s


def test_impatient_dfme_over_http_loses_refused_queries_from_its_budget(guarded_server, digits_demo):
    from hardening.extraction_audit import run_http_extraction

    srv, keys = guarded_server
    run = run_http_extraction(srv.url, digits_demo.model_path, digits_demo.data_path, keys=keys[1:2], budget=150,
                              attack="dfme+gate", torch_source=digits_demo.torch_path, train_steps=10)
    led = run.ledger
    assert led["sent"] == 150 and led["balanced"] and led["errors"] == 0
    assert led["answered"] + led["rejected"] + led["rate_limited"] == 150
    assert led["rejected"] > 0 and run.trained_on == led["answered"] and run.retries == 0
