"""Extraction against a real ``edgeward serve`` process on loopback: every query accounted for.

The server's own Prometheus counters are the independent witness: the attacker's ledger
(answered / rate-limited / rejected) must match what the server says it answered, with no
request lost or counted twice.
"""

from __future__ import annotations

import re

import pytest
import requests

from api_fixtures import api_env  # noqa: F401
from servers import ServerProcess


def _server_counts(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for m in re.finditer(r'^edgeward_http_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("method") == "POST" and "predict" in labels.get("endpoint", ""):
            counts[labels["status"]] = counts.get(labels["status"], 0.0) + float(m.group(2))
    return counts


@pytest.fixture(scope="module")
def rate_limited_server(api_env, tmp_path_factory):  # noqa: F811
    from api.auth import add_key

    root = tmp_path_factory.mktemp("extr_http")
    keys_path = root / "keys.json"
    keys = [add_key(keys_path, f"thief{i}") for i in range(3)]
    bundle = api_env.make_bundle(root / "b.ewb", 1, runtime=api_env.runtime(per_client="40/hour"))
    srv = ServerProcess(api_env.serve_args(bundle, "--api-keys", str(keys_path)), root / "server.log").start()
    yield srv, keys
    srv.stop()


def test_http_extraction_accounts_for_every_query(rate_limited_server, digits_demo):
    from hardening.extraction_audit import run_http_extraction

    srv, keys = rate_limited_server
    before = _server_counts(srv.url)
    run = run_http_extraction(srv.url, digits_demo.model_path, digits_demo.data_path, keys=keys[:1], budget=100,
                              torch_source=digits_demo.torch_path, train_steps=60)
    led = run.ledger
    assert led["sent"] == 100 and led["balanced"]
    assert led["answered"] == 40 and led["rate_limited"] == 60 and led["errors"] == 0
    assert run.retry_after_max_s is not None and run.retry_after_max_s > 0
    assert run.trained_on == 40  # the 60 refused queries were not turned into labels
    after = _server_counts(srv.url)
    assert after.get("200", 0) - before.get("200", 0) == led["answered"]
    assert after.get("429", 0) - before.get("429", 0) == led["rate_limited"]
    assert sum(after.values()) - sum(before.values()) == led["sent"]


def test_sybil_keys_multiply_the_answered_budget(rate_limited_server, digits_demo):
    from hardening.extraction_audit import run_http_extraction

    srv, keys = rate_limited_server
    run = run_http_extraction(srv.url, digits_demo.model_path, digits_demo.data_path, keys=keys[1:3], budget=90,
                              scenario="noise", torch_source=digits_demo.torch_path, train_steps=30)
    assert run.ledger["sent"] == 90 and run.ledger["balanced"]
    assert [k["answered"] for k in run.per_key] == [40, 40]
    assert [k["sent"] for k in run.per_key] == [45, 45]
    assert sum(k["rate_limited"] for k in run.per_key) == run.ledger["rate_limited"] == 10


def test_http_rejections_by_the_ood_gate_are_counted(api_env, digits_demo, tmp_path):  # noqa: F811
    """A gate that rejects (422) low-confidence inputs: noise queries are refused, each counted once."""
    import numpy as np

    from hardening.extraction_audit import run_http_extraction
    from runtime_guard.anomaly import AnomalyScorer

    from api_fixtures import empty_npz, msp_detector_meta

    probe = AnomalyScorer.from_bytes(empty_npz(), msp_detector_meta(None))
    honest = probe.score(None, api_env.logits, None)
    threshold = float(np.quantile(honest, 0.95))
    runtime = api_env.runtime(anomaly="reject", threshold=threshold)
    bundle = api_env.make_bundle(tmp_path / "gate.ewb", 1, runtime=runtime)
    with ServerProcess(api_env.serve_args(bundle), tmp_path / "server.log") as srv:
        before = _server_counts(srv.url)
        run = run_http_extraction(srv.url, digits_demo.model_path, digits_demo.data_path, keys=[], budget=60,
                                  scenario="noise", torch_source=digits_demo.torch_path, train_steps=30)
        after = _server_counts(srv.url)
    led = run.ledger
    assert led["sent"] == 60 and led["balanced"] and led["rate_limited"] == 0 and led["errors"] == 0
    assert led["rejected"] > 0 and led["answered"] + led["rejected"] == 60
    assert run.trained_on == led["answered"]
    assert after.get("422", 0) - before.get("422", 0) == led["rejected"]
    assert after.get("200", 0) - before.get("200", 0) == led["answered"]
