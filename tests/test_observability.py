"""Operator-facing observability of the real server process: X-Request-ID, the JSON
access log (and turning it off), process/python metrics, OpenMetrics negotiation,
compute-time histogram, and ``promtool check metrics`` on the exposition."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
import requests

from api_fixtures import api_env, bundle_v1  # noqa: F401
from servers import ServerProcess, keyed_server

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def live(api_env, bundle_v1, tmp_path_factory):
    with keyed_server(api_env, bundle_v1, tmp_path_factory.mktemp("observability"), "ops") as (srv, keys):
        yield srv, keys["ops"]


def _body(api_env):
    return {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": api_env.x[0].ravel().tolist()}]}


def _access_lines(srv, rid):
    deadline = time.time() + 5
    while time.time() < deadline:
        lines = [json.loads(line) for line in srv.log_path.read_text().splitlines()
                 if line.startswith("{") and '"request_id"' in line]
        hit = [entry for entry in lines if entry["request_id"] == rid]
        if hit:
            return hit
        time.sleep(0.1)
    return []


def test_request_id_and_access_log(live, api_env):
    srv, key = live
    auth = {"X-API-Key": key}
    r = requests.post(srv.url + INFER, json=_body(api_env), headers={**auth, "X-Request-ID": "trace-1.a:b"})
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-1.a:b"
    for bad in ("has space", "x" * 129, "ümlaut", "a,b"):  # refused ids are replaced, not echoed
        r = requests.get(srv.url + "/healthz", headers={"X-Request-ID": bad.encode().decode("latin-1")})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"]), bad
    generated = requests.get(srv.url + "/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    [line] = _access_lines(srv, "trace-1.a:b")
    assert line["route"] == "/v2/models/<name>/infer" and line["method"] == "POST"
    assert line["status"] == 200 and line["decision"] == "accepted" and line["transport"] == "http"
    assert line["latency_ms"] > 0 and re.fullmatch(r"[0-9a-f]{16}", line["client"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    # refusals carry the guard's decision; unauthenticated ones no client
    bad = _body(api_env)
    bad["inputs"][0]["data"] = [5.0] * 64  # outside the signed value range
    requests.post(srv.url + INFER, json=bad, headers={**auth, "X-Request-ID": "trace-2"})
    requests.post(srv.url + INFER, json=bad, headers={"X-Request-ID": "trace-3"})
    [rejected] = _access_lines(srv, "trace-2")
    [unauth] = _access_lines(srv, "trace-3")
    assert (rejected["status"], rejected["decision"], rejected["client"]) == (400, "rejected", line["client"])
    assert (unauth["status"], unauth["decision"], unauth["client"]) == (401, None, None)
    log = srv.log_path.read_text()
    assert key not in log and "5.0, 5.0" not in log and "127.0.0.1\"" not in log  # no keys, inputs, addresses


def test_access_log_can_be_turned_off(api_env, bundle_v1, tmp_path):
    with ServerProcess(api_env.serve_args(bundle_v1, "--no-access-log"), tmp_path / "s.log") as srv:
        r = requests.post(srv.url + INFER, json=_body(api_env), headers={"X-Request-ID": "quiet-1"})
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "quiet-1"
        time.sleep(0.3)
        assert '"request_id"' not in srv.log()


def test_metrics_process_openmetrics_and_promtool(live, api_env):
    srv, key = live
    requests.post(srv.url + INFER, json=_body(api_env), headers={"X-API-Key": key})
    r = requests.get(srv.url + "/metrics")
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info",
                   "python_gc_collections_total", 'edgeward_inference_compute_seconds_bucket{le="0.005",transport="http"}'):
        assert family in r.text, family
    om = requests.get(srv.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF") and "process_cpu_seconds_total" in om.text
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(om.text)}  # strict OpenMetrics parser
    assert {"process_cpu_seconds", "edgeward_http_requests", "edgeward_inference_compute_seconds"} <= names
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: scripts/install-system-deps.sh installs Debian's prometheus"
    # promtool lints the Prometheus text format (its parser does not take OpenMetrics)
    out = subprocess.run([promtool, "check", "metrics"], input=r.text, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rate_limit_reset_is_a_delay_everywhere(api_env, tmp_path):
    """X-RateLimit-Reset, RateLimit-Reset and Retry-After are all delay seconds (not an
    epoch), equal between the two header families, and within the window."""
    from api import create_app

    bundle = api_env.make_bundle(tmp_path / "b.ewb", 1, runtime=api_env.runtime(per_client="2/minute"))
    client = create_app(api_env.app_config(bundle, rate_limit_headers="always")).test_client()
    body = _body(api_env)
    answers = [client.post(INFER, json=body) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    for r in answers:
        reset = int(r.headers["RateLimit-Reset"])
        assert 0 <= reset <= 60
    refused = answers[2]
    assert refused.headers["X-RateLimit-Reset"] == refused.headers["RateLimit-Reset"]
    # one limiter figure behind both: the oldest of the two hits made just now leaves the window in ~60 s
    wait = int(refused.headers["Retry-After"])
    assert wait == max(1, int(refused.headers["RateLimit-Reset"])), refused.headers
    assert 50 <= wait <= 60, wait
    assert refused.json["error"]
