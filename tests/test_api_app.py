"""In-process tests of the Flask app (test client, real bundles and sessions)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest

from api.body import encode_npy

from api_fixtures import (  # noqa: F401  (fixtures)
    ADMIN_TOKEN,
    add_to_logits,
    api_env,
    bundle_v1,
    crashing_model,
    json_body,
)

ADMIN = {"Authorization": "Bearer " + ADMIN_TOKEN}


@pytest.fixture(scope="module")
def app(api_env, bundle_v1):
    from api import create_app

    return create_app(api_env.app_config(bundle_v1, admin_token=ADMIN_TOKEN))


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


def problem(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/problem+json"
    body = resp.get_json(force=True)
    assert body["status"] == status and body["type"].startswith("https://") and body["title"]
    return body


# -- predict -----------------------------------------------------------------

def test_predict_json_matches_bare_model(client, api_env):
    r = client.post("/v1/predict", data=json_body(api_env.x[:5]), content_type="application/json")
    assert r.status_code == 200
    body = r.get_json()
    assert body["decision"] == "accepted" and body["model"] == {"name": "digits", "version": 1}
    assert body["labels"] == api_env.labels[:5].tolist()
    scores = np.asarray(body["scores"])
    assert scores.shape == (5, 6) and np.allclose(scores.sum(axis=1), 1.0)
    assert "RateLimit-Limit" not in r.headers  # default: budget shown on 429s only


def test_predict_npy_single_sample(client, api_env):
    r = client.post("/v1/predict", data=encode_npy(api_env.x[3]), content_type="application/x-npy")
    assert r.status_code == 200
    assert r.get_json()["labels"] == [int(api_env.labels[3])]


@pytest.mark.parametrize("inputs,check", [
    ("[[0, 0, 0, 0, 0]]", "shape"),
    ('"abc"', "json-type"),
    ('[["1.0"]]', "json-type"),
    ("[[true, false]]", "json-type"),
    ("[[null]]", "json-type"),
    ("[[1.0], [1.0, 2.0]]", "json-shape"),
    ("[[]]", "json-shape"),
    ("[1e400]", "json-type"),
    ("[" + "9" * 400 + "]", "json-type"),
    ("[[[[[[[[[[0.0]]]]]]]]]]", "json-shape"),
])
def test_predict_bad_json_inputs_are_400_naming_the_check(client, inputs, check):
    r = client.post("/v1/predict", data='{"inputs": %s}' % inputs, content_type="application/json")
    assert problem(r, 400)["check"] == check


def test_sanitizer_range_and_batch_checks_are_named(client, api_env):
    body = problem(client.post("/v1/predict", data=json_body(api_env.x[:2] * 3),
                               content_type="application/json"), 400)
    assert body["check"] == "range"
    big = np.zeros((65, 1, 8, 8), np.float32)
    assert problem(client.post("/v1/predict", data=encode_npy(big), content_type="application/x-npy"),
                   400)["check"] == "batch_size"
    f64 = api_env.x[:1].astype(np.float64)
    assert problem(client.post("/v1/predict", data=encode_npy(f64), content_type="application/x-npy"),
                   400)["check"] == "dtype"


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[1,2]", b'{"inputs": NaN}', b'{"inputs": [Infinity]}', b"\xff\xfe", b'{"x": 1}',
])
def test_malformed_json_is_400(client, raw):
    problem(client.post("/v1/predict", data=raw, content_type="application/json"), 400)


def _npy(header: dict, payload: bytes) -> bytes:
    from numpy.lib import format as npf

    bio = io.BytesIO()
    npf.write_array_header_1_0(bio, header)
    return bio.getvalue() + payload


def test_npy_refuses_pickles_objects_and_lying_headers(client):
    obj = _npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x80\x04N.")
    assert problem(client.post("/v1/predict", data=obj, content_type="application/x-npy"),
                   400)["check"] == "npy-dtype"
    huge = _npy({"descr": "<f4", "fortran_order": False, "shape": (10 ** 6, 10 ** 6)}, b"\0" * 16)
    assert problem(client.post("/v1/predict", data=huge, content_type="application/x-npy"),
                   400)["check"] == "npy-shape"
    short = _npy({"descr": "<f4", "fortran_order": False, "shape": (1, 1, 8, 8)}, b"\0" * 10)
    assert problem(client.post("/v1/predict", data=short, content_type="application/x-npy"),
                   400)["check"] == "npy-shape"
    structured = _npy({"descr": [("a", "<f4")], "fortran_order": False, "shape": (1,)}, b"\0" * 4)
    assert problem(client.post("/v1/predict", data=structured, content_type="application/x-npy"),
                   400)["check"] == "npy-dtype"
    for junk in (b"", b"garbage", b"\x93NUMPY\x09\x00zzzz"):
        assert problem(client.post("/v1/predict", data=junk, content_type="application/x-npy"),
                       400)["check"] == "npy"


def test_unknown_content_type_is_415_and_large_body_413(client, app):
    problem(client.post("/v1/predict", data=b"1,2,3", content_type="text/csv"), 415)
    problem(client.post("/v1/predict", data=b"{}"), 415)  # no content type
    limit = app.config["MAX_CONTENT_LENGTH"]
    problem(client.post("/v1/predict", data=b"0" * (limit + 1), content_type="application/json"), 413)


def test_http_errors_are_problem_json(client):
    problem(client.get("/no/such/path"), 404)
    r = client.delete("/v1/predict")
    problem(r, 405)
    assert "POST" in r.headers["Allow"]
    problem(client.get("/v1/predict"), 405)


def test_every_response_has_security_headers_and_is_counted(app, api_env):
    """The WSGI-level observer: headers and per-route metrics on success, refusals,
    unknown paths and framework errors alike."""
    c = app.test_client()
    ok = c.post("/v1/predict", data=json_body(api_env.x[:1]), content_type="application/json")
    responses = [ok, c.post("/v1/predict", data=b"1,2", content_type="text/csv"),
                 c.get("/no/such/path"), c.delete("/v1/predict"), c.get("/healthz")]
    assert [r.status_code for r in responses] == [200, 415, 404, 405, 200]
    for r in responses:
        assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers.getlist("Cache-Control") == ["no-store"]  # added once, not per layer
    text = c.get("/metrics").get_data(as_text=True)
    for rule, method, status in [("/v1/predict", "POST", 200), ("/v1/predict", "POST", 415),
                                 ("unmatched", "GET", 404), ("/healthz", "GET", 200)]:
        assert f'edgeward_http_requests_total{{endpoint="{rule}",method="{method}",status="{status}"}}' in text
    assert 'edgeward_request_latency_seconds_count{endpoint="/v1/predict"}' in text


def test_body_without_content_length_is_read_and_bounded(app, api_env):
    """Chunked bodies (no Content-Length) take werkzeug's bounded path; same answer."""
    c = app.test_client()
    body = json_body(api_env.x[:2]).encode()
    want = c.post("/v1/predict", data=body, content_type="application/json").get_json()
    chunked_env = {"wsgi.input_terminated": True}  # as waitress and gunicorn declare
    chunked = c.post("/v1/predict", input_stream=io.BytesIO(body), content_type="application/json",
                     headers={"Transfer-Encoding": "chunked"}, environ_overrides=chunked_env)
    assert chunked.status_code == 200 and chunked.get_json()["labels"] == want["labels"]
    big = b"[" + b"0," * app.config["MAX_CONTENT_LENGTH"] + b"0]"
    r = c.post("/v1/predict", input_stream=io.BytesIO(big), content_type="application/json",
               headers={"Transfer-Encoding": "chunked"}, environ_overrides=chunked_env)
    problem(r, 413)


def test_body_limit_is_exact_for_declared_and_chunked_bodies(app):
    """A body of exactly the limit is read whole (then refused as JSON: 400), one byte
    more is 413 ``payload-too-large``, with a Content-Length or chunked alike."""
    c = app.test_client()
    limit = app.config["MAX_CONTENT_LENGTH"]
    chunked = {"headers": {"Transfer-Encoding": "chunked"}, "environ_overrides": {"wsgi.input_terminated": True}}
    for size, status in ((limit, 400), (limit + 1, 413)):
        body = b" " * size
        for how in ({"data": body}, {"input_stream": io.BytesIO(body), **chunked}):
            got = problem(c.post("/v1/predict", content_type="application/json", **how), status)
            assert got["type"].endswith("payload-too-large" if status == 413 else "invalid-body"), (size, how.keys())


def test_model_info_has_schema_but_no_secrets(client, api_env):
    info = client.get("/v1/model").get_json()
    assert info["input"]["sample_shape"] == [1, 8, 8] and info["output"]["num_classes"] == 6
    assert info["output"]["policy"] == "full"
    text = json.dumps(info)
    assert api_env.kek.hex() not in text and "payloads" not in text and "crypto" not in text


def test_health_ready_metrics_openapi(client, api_env):
    assert client.get("/healthz").get_json()["status"] == "ok"
    assert client.get("/readyz").get_json()["model"]["version"] >= 1
    client.post("/v1/predict", data=b"{}", content_type="application/json")
    client.post("/v1/predict", data=json_body(api_env.x[:1]), content_type="application/json")
    text = client.get("/metrics").get_data(as_text=True)
    assert "edgeward_http_requests_total{" in text
    assert "edgeward_request_latency_seconds_bucket{" in text
    assert 'edgeward_decisions_total{decision="accepted",reason="none"}' in text
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.") and "/v1/predict" in doc["paths"]


def test_routes_and_openapi_paths_agree(app):
    doc = app.test_client().get("/openapi.json").get_json()
    documented = {(p.replace("{name}", "<name>").replace("{version}", "<version>"), m.upper())
                  for p, ops in doc["paths"].items() for m in ops}
    served = {(r.rule, m) for r in app.url_map.iter_rules() if r.endpoint != "static"
              for m in r.methods - {"HEAD", "OPTIONS"}}
    assert documented == served


# -- v2 ---------------------------------------------------------------------

def test_v2_protocol(client, api_env):
    assert client.get("/v2/health/ready").get_json() == {"ready": True}
    meta = client.get("/v2/models/digits").get_json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    req = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                   "data": api_env.x[:2].ravel().tolist()}]}
    out = client.post("/v2/models/digits/infer", json=req).get_json()
    assert out["id"] == "r1" and out["outputs"][0]["data"] == api_env.labels[:2].tolist()
    assert out["outputs"][1]["shape"] == [2, 6]
    body = problem(client.post("/v2/models/other/infer", json=req), 404)
    assert "error" in body
    req["inputs"][0]["shape"] = [3, 1, 8, 8]
    assert problem(client.post("/v2/models/digits/infer", json=req), 400)["check"] == "oip-shape"
    req["inputs"][0].update(shape=[1, 1, 8, 8], datatype="UINT8", data=[0.5] * 64)
    assert problem(client.post("/v2/models/digits/infer", json=req), 400)["check"] == "oip-datatype"


def test_v2_tensors_are_checked_exactly(client, api_env):
    """Every malformed tensor is a 400 problem naming the check; never a 200 or a 500."""
    x = api_env.x[0].ravel().tolist()
    nested = api_env.x[:1].tolist()  # [1][1][8][8]

    def infer(tensor=None, **doc):
        t = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x}
        t.update(tensor or {})
        return client.post("/v2/models/digits/infer", json={"inputs": [t], **doc})

    ok = infer({"data": nested})  # exact nesting is fine
    assert ok.status_code == 200 and ok.get_json()["outputs"][0]["data"] == [int(api_env.labels[0])]
    u8 = infer({"datatype": "UINT8", "data": [0] * 64})
    assert u8.status_code == 200
    bad = {
        # non-list items inside nested data used to be dropped silently
        "oip-shape": [{"data": [nested[0][0][:7] + [5.0]]}, {"data": [[x[:32], 1.0]]},
                      {"data": [[[[0.0] * 8] * 8]] + [0.0]}, {"data": x + [0.0]},
                      {"data": [[[[[0.0]] * 8] * 8]]}],
        "oip-datatype": [{"datatype": {"x": 1}}, {"datatype": ["FP32"]}, {"datatype": "BYTES"},
                         {"datatype": "UINT64", "data": [2**64 - 1] * 64},  # exact: passes type, then range
                         {"datatype": "UINT64", "data": [2**64] * 64},
                         {"datatype": "INT8", "data": [128] * 64}, {"datatype": "UINT8", "data": [-1] * 64},
                         {"datatype": "INT32", "data": [0.5] * 64}, {"datatype": "INT32", "data": [1.0] * 64},
                         {"datatype": "FP16", "data": [1e5] * 64}, {"datatype": "FP32", "data": [1e39] * 64},
                         {"datatype": "FP64", "data": [10**400] * 64}],
        "json-type": [{"data": [True] * 64}, {"data": ["0.5"] * 64}, {"data": [None] * 64}],
        "oip-name": [{"name": "wrong"}, {"name": 3}, {"name": None}],
        "oip": [{"parameters": []}, {"data": "abc"}],
    }
    for check, cases in bad.items():
        for t in cases:
            r = infer(t)
            assert r.status_code == 400, (t, r.status_code, r.get_data(as_text=True)[:200])
            body = r.get_json()
            if not (check == "oip-datatype" and t.get("datatype") == "UINT64" and t["data"][0] == 2**64 - 1):
                assert body["check"] == check, (t, body)
            assert "error" in body and r.headers["Content-Type"] == "application/problem+json"
    # 2**64-1 is a valid UINT64: it reaches the sanitizer and fails its value range, not the type
    r = infer({"datatype": "UINT64", "data": [2**64 - 1] * 64})
    assert r.get_json()["check"] == "range"
    for doc in ({"id": 5}, {"parameters": "x"}, {"outputs": {}}):
        r = infer(**doc)
        assert r.status_code == 400 and r.get_json()["check"] == "oip", doc


# -- auth -------------------------------------------------------------------

def test_api_keys_hashed_and_checked(api_env, bundle_v1, tmp_path):
    from api import create_app
    from api.auth import add_key

    keys = tmp_path / "keys.json"
    alice = add_key(keys, "alice")
    assert alice not in keys.read_text() and (keys.stat().st_mode & 0o077) == 0
    app = create_app(api_env.app_config(bundle_v1, api_keys_file=str(keys)))
    c = app.test_client()
    body = json_body(api_env.x[:1])
    r = c.post("/v1/predict", data=body, content_type="application/json")
    assert problem(r, 401) and r.headers["WWW-Authenticate"].startswith("Bearer")
    problem(c.post("/v1/predict", data=body, content_type="application/json",
                   headers={"Authorization": "Bearer " + alice[:-1] + "x"}), 401)
    assert c.post("/v1/predict", data=body, content_type="application/json",
                  headers={"Authorization": "Bearer " + alice}).status_code == 200
    assert c.post("/v1/predict", data=body, content_type="application/json",
                  headers={"X-API-Key": alice}).status_code == 200
    # a client key never opens admin endpoints; with no admin token they are disabled
    problem(c.post("/v1/admin/reload", headers={"Authorization": "Bearer " + alice}), 403)
    doc = c.get("/openapi.json").get_json()
    assert doc["paths"]["/v1/predict"]["post"]["security"]


def test_admin_token_required(client):
    problem(client.post("/v1/admin/reload"), 401)
    problem(client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong-token-123456789"}), 403)
    assert client.get("/v1/admin/status", headers=ADMIN).get_json()["ready"] is True


# -- policies from the signed runtime config ---------------------------------

def test_rate_limit_429_headers(api_env, tmp_path):
    from api import create_app

    b = api_env.make_bundle(tmp_path / "rl.ewb", 1, runtime=api_env.runtime(per_client="3/minute"))
    body = json_body(api_env.x[:1])
    for mode in ("refusals", "always"):
        c = create_app(api_env.app_config(b, rate_limit_headers=mode)).test_client()
        answers = [c.post("/v1/predict", data=body, content_type="application/json") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        if mode == "always":
            assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
            assert {a.headers["RateLimit-Limit"] for a in answers} == {"3"}
        else:
            assert not any("RateLimit-Limit" in a.headers for a in answers)
        r = c.post("/v1/predict", data=body, content_type="application/json")
        p = problem(r, 429)
        assert int(r.headers["Retry-After"]) >= 1 and p["retry_after"] >= 1
        assert r.headers["RateLimit-Limit"] == "3" and r.headers["RateLimit-Remaining"] == "0"
        assert r.headers["X-RateLimit-Limit"] == "3" and int(r.headers["RateLimit-Reset"]) >= 1
    with pytest.raises(ValueError, match="rate_limit_headers"):
        api_env.app_config(b, rate_limit_headers="sometimes")


def test_anomaly_gate_reject_is_422_and_flag_is_200(api_env, tmp_path):
    from api import create_app

    body = json_body(api_env.x[:2])
    # threshold -1: every (non-negative) MSP score is anomalous
    rej = api_env.make_bundle(tmp_path / "rej.ewb", 1, runtime=api_env.runtime(anomaly="reject", threshold=-1.0))
    c = create_app(api_env.app_config(rej)).test_client()
    p = problem(c.post("/v1/predict", data=body, content_type="application/json"), 422)
    assert p["check"] == "anomaly" and "ood" in p["reasons"]
    flag = api_env.make_bundle(tmp_path / "flag.ewb", 1, runtime=api_env.runtime(anomaly="flag", threshold=-1.0))
    c = create_app(api_env.app_config(flag)).test_client()
    r = c.post("/v1/predict", data=body, content_type="application/json")
    assert r.status_code == 200 and r.get_json()["decision"] == "flagged"
    assert "ood" in r.get_json()["reasons"]
    # a permissive threshold (null = +inf) lets the same inputs through
    ok = api_env.make_bundle(tmp_path / "ok.ewb", 1, runtime=api_env.runtime(anomaly="reject", threshold=None))
    c = create_app(api_env.app_config(ok)).test_client()
    assert c.post("/v1/predict", data=body, content_type="application/json").get_json()["decision"] == "accepted"


def _nan_model(model_bytes: bytes, bad_above: float = 0.9) -> bytes:
    """The demo model whose logits become +Inf when the first pixel is above ``bad_above``
    (the golden set and the guard's mid-range smoke sample stay finite)."""
    from onnx import helper, numpy_helper

    return add_to_logits(model_bytes, [
        numpy_helper.from_array(np.array(bad_above, np.float32), "nf_cut"),
        numpy_helper.from_array(np.array(np.inf, np.float32), "nf_inf"),
        numpy_helper.from_array(np.array(0.0, np.float32), "nf_zero"),
    ], lambda first: [
        helper.make_node("Greater", [first, "nf_cut"], ["nf_bad"]),
        helper.make_node("Where", ["nf_bad", "nf_inf", "nf_zero"], ["nf_add"]),
    ], "nf_add")


def test_non_finite_model_output_is_a_5xx_naming_the_output_not_the_anomaly_gate(api_env, tmp_path):
    """Regression: ``output:non_finite`` was answered 422 "the anomaly gate rejected this input"."""
    from api import create_app

    b = api_env.make_bundle(tmp_path / "nan.ewb", 1, model_bytes=_nan_model(api_env.model_bytes),
                            runtime=api_env.runtime(anomaly="flag", threshold=None))
    c = create_app(api_env.app_config(b)).test_client()
    good = api_env.x[:1].copy()
    good[0, 0, 0, 0] = 0.0
    assert c.post("/v1/predict", data=json_body(good), content_type="application/json").status_code == 200
    bad = good.copy()
    bad[0, 0, 0, 0] = 1.0
    p = problem(c.post("/v1/predict", data=json_body(bad), content_type="application/json"), 500)
    assert p["type"].endswith("/model-output-invalid") and p["check"] == "output"
    assert p["decision"] == "rejected" and p["reasons"] == ["output:non_finite"]
    assert "anomaly" not in p["detail"] and "not finite" in p["detail"]
    text = c.get("/metrics").get_data(as_text=True)
    assert 'edgeward_decisions_total{decision="rejected",reason="output:non_finite"} 1.0' in text


def test_each_request_counts_one_decision_and_every_reason(api_env, tmp_path):
    from api import create_app

    rej = api_env.make_bundle(tmp_path / "rej.ewb", 1, runtime=api_env.runtime(anomaly="reject", threshold=-1.0))
    c = create_app(api_env.app_config(rej)).test_client()
    for _ in range(3):
        problem(c.post("/v1/predict", data=json_body(api_env.x[:2]), content_type="application/json"), 422)
    text = c.get("/metrics").get_data(as_text=True)
    assert 'edgeward_decisions_total{decision="rejected",reason="ood"} 3.0' in text
    assert 'edgeward_reasons_total{reason="ood"} 3.0' in text


# -- hot update ---------------------------------------------------------------

def test_reload_refuses_bad_bundles_and_keeps_serving(api_env, bundle_v1, tmp_path):
    from api import create_app
    from runtime_guard.bundle import generate_signing_keypair

    app = create_app(api_env.app_config(bundle_v1, admin_token=ADMIN_TOKEN))
    c = app.test_client()

    def reload(path):
        return c.post("/v1/admin/reload", json={"path": str(path)}, headers=ADMIN)

    other_priv, _ = generate_signing_keypair()
    forged = api_env.make_bundle(tmp_path / "forged.ewb", 5, signing_key=other_priv)
    assert problem(reload(forged), 409)["check"] == "signature"
    smoke_fail = api_env.make_bundle(tmp_path / "smoke.ewb", 6, golden=api_env.golden(wrong=True))
    assert problem(reload(smoke_fail), 409)["check"] == "smoke-test"
    assert problem(reload(tmp_path / "missing.ewb"), 409)["check"] in ("io", "load")
    good = api_env.make_bundle(tmp_path / "v2.ewb", 2)
    assert reload(good).get_json()["outcome"] == "swapped"
    assert problem(reload(bundle_v1), 409)["check"] == "version"  # lower version
    assert reload(good).get_json()["outcome"] == "unchanged"
    assert c.get("/v1/model").get_json()["version"] == 2
    r = c.post("/v1/predict", data=json_body(api_env.x[:1]), content_type="application/json")
    assert r.get_json()["model"]["version"] == 2
    metrics = c.get("/metrics").get_data(as_text=True)
    assert 'edgeward_reloads_total{outcome="refused"} 4.0' in metrics
    assert "edgeward_model_version 2.0" in metrics


def test_error_rate_after_swap_rolls_back(api_env, bundle_v1, tmp_path):
    from api import create_app
    from api.reload import RollbackTrigger

    state_file = tmp_path / "rollback.json"
    app = create_app(api_env.app_config(
        bundle_v1, admin_token=ADMIN_TOKEN, rollback_state=str(state_file),
        rollback_trigger=RollbackTrigger(max_error_rate=0.3, min_requests=10, window_s=60)))
    c = app.test_client()
    assert json.loads(state_file.read_text())["version"] == 1  # initial bundle committed
    bad = api_env.make_bundle(tmp_path / "crash.ewb", 2, model_bytes=crashing_model(api_env.model_bytes))
    r = c.post("/v1/admin/reload", json={"path": str(bad)}, headers=ADMIN)
    assert r.get_json()["outcome"] == "swapped"  # passes verification and the smoke test
    x = api_env.x[:1].copy()
    x[0, 0, 0, 0] = 1.0  # the fault: first pixel above 0.625
    codes = [c.post("/v1/predict", data=json_body(x), content_type="application/json").status_code
             for _ in range(10)]
    assert codes == [500] * 10
    body = c.post("/v1/predict", data=json_body(x), content_type="application/json")
    assert body.status_code == 200 and body.get_json()["model"]["version"] == 1  # rolled back
    status = c.get("/v1/admin/status", headers=ADMIN).get_json()
    assert status["last_event"]["outcome"] == "rolled-back" and status["current"]["version"] == 1
    assert json.loads(state_file.read_text())["version"] == 1  # never committed to v2
    assert problem(c.post("/v1/admin/reload", json={"path": str(bad)}, headers=ADMIN), 409)["check"] == "known-bad"
    # 500 bodies never leak exception text
    assert "Gather" not in json.dumps(c.get("/v1/admin/status", headers=ADMIN).get_json())


def test_probation_commits_after_window(api_env, bundle_v1, tmp_path):
    from api import create_app
    from api.reload import RollbackTrigger

    state_file = tmp_path / "rollback.json"
    app = create_app(api_env.app_config(
        bundle_v1, admin_token=ADMIN_TOKEN, rollback_state=str(state_file),
        rollback_trigger=RollbackTrigger(window_s=0.2)))
    c = app.test_client()
    v2 = api_env.make_bundle(tmp_path / "v2.ewb", 2)
    assert c.post("/v1/admin/reload", json={"path": str(v2)}, headers=ADMIN).status_code == 200
    assert json.loads(state_file.read_text())["version"] == 1  # on probation: not committed yet
    time.sleep(0.3)
    status = c.get("/v1/admin/status", headers=ADMIN).get_json()
    assert status["probation"] is None and status["last_event"]["outcome"] == "committed"
    assert json.loads(state_file.read_text())["version"] == 2


def test_not_ready_until_watch_dir_has_a_bundle(api_env, tmp_path):
    from api import create_app

    watch = tmp_path / "watch"
    watch.mkdir()
    app = create_app(api_env.app_config(None, watch_dir=str(watch), watch_interval_s=0.05))
    c = app.test_client()
    r = c.get("/readyz")
    problem(r, 503)
    assert r.headers["Retry-After"]
    problem(c.post("/v1/predict", data=json_body(api_env.x[:1]), content_type="application/json"), 503)
    assert c.get("/v2/health/ready").status_code == 503
    api_env.make_bundle(watch / "a.ewb", 3)
    deadline = time.time() + 10
    while c.get("/readyz").status_code != 200 and time.time() < deadline:
        time.sleep(0.05)
    assert c.get("/v1/model").get_json()["version"] == 3
    app.extensions["edgeward"].watcher.stop()


def test_json_fast_path_equals_checked_path():
    """The one-call numpy conversion gives the same float32 array as the checked
    path, and anything it cannot vouch for (strings, booleans, nulls, ragged rows)
    falls through to the checked path's named errors."""
    from api.body import json_to_array
    from api.problems import ApiProblem

    rng = np.random.default_rng(0)
    vals = (rng.standard_normal((3, 1, 8, 8)) * 10.0 ** rng.integers(-30, 30, (3, 1, 8, 8))).tolist()
    vals[0][0][0][:3] = [0, -7, 2 ** 40]  # ints mixed in
    body = json.dumps({"inputs": vals}).encode()
    fast = json_to_array(json.loads(body)["inputs"], body)
    checked = json_to_array(vals)  # default data=b"null" forces the checked path
    assert fast.dtype == checked.dtype == np.float32
    np.testing.assert_array_equal(fast, checked)
    for inputs, check in [([["1.5"]], "json-type"), ([[1, True]], "json-type"), ([[1, None]], "json-type"),
                          ([[1, 2], [3]], "json-shape"), ([[1e39]], "json-type")]:
        body = json.dumps({"inputs": inputs}).encode()
        with pytest.raises(ApiProblem) as e:
            json_to_array(inputs, body)
        assert e.value.extra["check"] == check, inputs
