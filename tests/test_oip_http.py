"""OIP v2 over HTTP, driven by the unmodified ``tritonclient.http`` against the real
``edgeward serve`` process: metadata, readiness, versioned routes, model config,
repository index, statistics, JSON and binary-tensor inference both ways for
every datatype; answers equal the in-process ``GuardedModel.predict``."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import requests

from api_fixtures import api_env, bundle_v1  # noqa: F401
from servers import keyed_server

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64",
             "UINT8", "UINT16", "UINT32", "UINT64"]


@pytest.fixture(scope="module")
def live(api_env, bundle_v1, tmp_path_factory):
    with keyed_server(api_env, bundle_v1, tmp_path_factory.mktemp("oip_http"), "triton") as (srv, keys):
        yield srv, keys["triton"]


@pytest.fixture(scope="module")
def guard(api_env, bundle_v1):
    return api_env.load_guard(bundle_v1)


@pytest.fixture(scope="module")
def client(live):
    srv, key = live
    c = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
    # a fresh dict per call: tritonclient adds Inference-Header-Content-Length to the one passed
    yield c, {"Authorization": f"Bearer {key}"}
    c.close()


def _expected(guard, x):
    res = guard.predict(x.astype(np.float32), "in-process")
    assert res.decision == "accepted"
    return res.labels, res.scores.astype(np.float32)


def test_health_metadata_config_index(client, live):
    c, _ = client
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("digits") and c.is_model_ready("digits", "1")
    assert not c.is_model_ready("digits", "2") and not c.is_model_ready("nope")
    meta = c.get_server_metadata()
    assert meta["name"] == "edgeward" and "binary_tensor_data" in meta["extensions"]
    m = c.get_model_metadata("digits", "1")
    assert m["inputs"][0]["shape"] == [-1, 1, 8, 8] and [o["name"] for o in m["outputs"]] == ["label", "scores"]
    assert c.get_model_metadata("digits") == m
    cfg = c.get_model_config("digits", "1")
    assert cfg["name"] == "digits" and cfg["input"][0]["dims"] == [1, 8, 8]
    assert c.get_model_repository_index() == [{"name": "digits", "version": "1", "state": "READY"}]
    with pytest.raises(InferenceServerException, match="no version '7'") as e:
        c.get_model_metadata("digits", "7")
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no model named") as e:
        c.get_model_config("other")
    # every /v2 error body carries `error`, also werkzeug's own 404/405
    srv, _ = live
    r = requests.get(srv.url + "/v2/models/digits/nothing")
    assert r.status_code == 404 and r.json()["error"]


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_json_and_binary(client, guard, api_env, binary_in, binary_out):
    c, auth = client
    x = api_env.x[:5]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in ("label", "scores")]
    res = c.infer("digits", [inp], model_version="1", outputs=outs, request_id="r-1", headers={**auth})
    labels, scores = _expected(guard, x)
    assert res.as_numpy("label").dtype == np.int64
    np.testing.assert_array_equal(res.as_numpy("label"), labels)
    np.testing.assert_allclose(res.as_numpy("scores"), scores, rtol=1e-6)
    r = res.get_response()
    assert r["id"] == "r-1" and r["model_version"] == "1"
    assert ("parameters" in r["outputs"][0]) == binary_out  # binary_data_size only for binary outputs


def test_requested_outputs_are_honoured(client, api_env, guard):
    c, auth = client
    inp = httpclient.InferInput("input", [2, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(api_env.x[:2])
    res = c.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("label")], headers={**auth})
    assert [o["name"] for o in res.get_response()["outputs"]] == ["label"]
    assert res.as_numpy("scores") is None
    # no outputs named: all of them, binary (tritonclient sets binary_data_output)
    res = c.infer("digits", [inp], headers={**auth})
    assert {o["name"] for o in res.get_response()["outputs"]} == {"label", "scores"}
    for name in ("logits", "scores_raw"):  # nothing beyond label and policy-shaped scores
        with pytest.raises(InferenceServerException, match="unknown output") as e:
            c.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput(name)], headers={**auth})
        assert e.value.status() == "400"


@pytest.mark.parametrize("datatype", DATATYPES)
def test_binary_every_datatype(client, guard, api_env, datatype):
    """Little-endian row-major for every OIP numeric datatype; values in [0, 1] so the
    sanitizer accepts them; the answer matches the in-process guard on the same values."""
    from tritonclient.utils import triton_to_np_dtype

    c, auth = client
    dt = triton_to_np_dtype(datatype)
    x = np.round(api_env.x[:3]) if np.dtype(dt).kind in "iu" else api_env.x[:3]
    typed = x.astype(dt)
    inp = httpclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(typed, binary_data=True)
    res = c.infer("digits", [inp], headers={**auth})
    labels, scores = _expected(guard, typed.astype(np.float32))
    np.testing.assert_array_equal(res.as_numpy("label"), labels)
    np.testing.assert_allclose(res.as_numpy("scores"), scores, rtol=1e-6)


def test_raw_wire_format_and_errors(live, api_env, guard):
    """The extension's framing by hand (no client): JSON without a Content-Type,
    explicit little-endian bytes, and refusals that all carry `error`."""
    srv, key = live
    u = srv.url + "/v2/models/digits/versions/1/infer"
    auth = {"Authorization": f"Bearer {key}"}
    x = api_env.x[:2]
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "scores", "parameters": {"binary_data": True}}]}).encode()
    raw = x.astype("<f4").tobytes()
    r = requests.post(u, data=head + raw, headers={**auth, "Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    size = meta["outputs"][0]["parameters"]["binary_data_size"]
    got = np.array(struct.unpack(f"<{size // 4}f", r.content[n:n + size])).reshape(meta["outputs"][0]["shape"])
    np.testing.assert_allclose(got, _expected(guard, x)[1], rtol=1e-6)
    # JSON, no Content-Type header at all
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": x[0].ravel().tolist()}]}).encode()
    r = requests.post(u, data=body, headers={**auth})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [int(_expected(guard, x[:1])[0][0])]
    bad = [
        (head + raw[:-4], {"Inference-Header-Content-Length": str(len(head))}, 400),  # short binary
        (head + raw, {"Inference-Header-Content-Length": "x"}, 400),
        (head + raw, {}, 400),  # binary tail without the header length: not JSON
        (body, {"Content-Type": "text/csv"}, 415),
    ]
    for data, headers, status in bad:
        r = requests.post(u, data=data, headers={**auth, **headers})
        assert r.status_code == status and r.json()["error"], (headers, r.text)
    r = requests.post(u, data=body)  # no key
    assert r.status_code == 401 and r.json()["error"]


def test_statistics(client, api_env):
    c, auth = client
    before = c.get_inference_statistics("digits", "1", headers={**auth})["model_stats"][0]
    inp = httpclient.InferInput("input", [3, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(api_env.x[:3])
    c.infer("digits", [inp], headers={**auth})
    after = c.get_inference_statistics("digits", headers={**auth})["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert c.get_inference_statistics()["model_stats"][0]["name"] == "digits"  # no key, like /metrics
    with pytest.raises(InferenceServerException) as e:
        c.get_inference_statistics("digits", "3")
    assert e.value.status() == "404"


def test_scores_follow_the_output_policy(api_env, tmp_path):
    """Under ``label_only`` the ``scores`` output is the policy's one-hot, never the model's
    probabilities (in-process app; the policy is applied before any transport)."""
    from api import create_app

    bundle = api_env.make_bundle(tmp_path / "lo.ewb", 1, runtime=api_env.runtime(policy="label_only"))
    client = create_app(api_env.app_config(bundle)).test_client()
    x = api_env.x[:3]
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "scores"}, {"name": "label"}]}
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.json
    assert [o["name"] for o in r.json["outputs"]] == ["scores", "label"]  # in the order asked
    scores = np.array(r.json["outputs"][0]["data"]).reshape(r.json["outputs"][0]["shape"])
    assert set(np.unique(scores)) <= {0.0, 1.0} and (scores.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(scores.argmax(axis=1), r.json["outputs"][1]["data"])
