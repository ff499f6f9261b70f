"""OIP v2 over gRPC, driven by the unmodified ``tritonclient.grpc`` against the real
``edgeward serve --grpc-port`` process: health, metadata, ModelInfer with
``raw_input_contents`` (every datatype) and typed contents, auth through the
``authorization`` metadata, rate limits and metrics shared with HTTP; answers
equal the in-process ``GuardedModel.predict``."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from api_fixtures import api_env, bundle_v1  # noqa: F401
from servers import free_port, keyed_server

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException, triton_to_np_dtype  # noqa: E402

DATATYPES = ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64",
             "UINT8", "UINT16", "UINT32", "UINT64"]


@pytest.fixture(scope="module")
def live(api_env, tmp_path_factory):
    d = tmp_path_factory.mktemp("oip_grpc")
    # a tight per-client budget, to show gRPC and HTTP spend the same one
    bundle = api_env.make_bundle(d / "b.ewb", 1, runtime=api_env.runtime(per_client="40/minute"))
    port = free_port()
    # "budget" is spent to exhaustion by one test only
    with keyed_server(api_env, bundle, d, "grpc", "budget", extra=("--grpc-port", str(port))) as (srv, keys):
        yield srv, keys["grpc"], port, bundle, keys["budget"]


@pytest.fixture(scope="module")
def guard(api_env, live):
    return api_env.load_guard(live[3])


@pytest.fixture(scope="module")
def client(live):
    srv, key, port = live[:3]
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    yield c, {"authorization": f"Bearer {key}"}
    c.close()


def _expected(guard, x):
    res = guard.predict(x.astype(np.float32), "in-process")
    assert res.decision == "accepted"
    return res.labels, res.scores.astype(np.float32)


def test_health_and_metadata(client, live):
    c, _ = client
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("digits") and c.is_model_ready("digits", "1")
    assert not c.is_model_ready("digits", "2") and not c.is_model_ready("other")
    assert c.get_server_metadata().name == "edgeward"
    m = c.get_model_metadata("digits", as_json=True)
    assert m["versions"] == ["1"] and [int(s) for s in m["inputs"][0]["shape"]] == [-1, 1, 8, 8]
    assert [o["name"] for o in m["outputs"]] == ["label", "scores"]
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("digits", "9")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    srv = live[0]
    text = requests.get(srv.url + "/metrics").text  # one registry for both transports
    assert 'endpoint="/inference.GRPCInferenceService/ModelMetadata",method="POST",status="404"' in text


@pytest.mark.parametrize("datatype", DATATYPES)
def test_infer_raw_every_datatype(client, guard, api_env, datatype):
    c, auth = client
    dt = triton_to_np_dtype(datatype)
    x = np.round(api_env.x[:3]) if np.dtype(dt).kind in "iu" else api_env.x[:3]
    typed = x.astype(dt)
    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(typed)  # tritonclient.grpc sends raw_input_contents
    res = c.infer("digits", [inp], request_id="g-1", headers={**auth, "x-request-id": f"grpc-{datatype}"})
    labels, scores = _expected(guard, typed.astype(np.float32))
    np.testing.assert_array_equal(res.as_numpy("label"), labels)
    np.testing.assert_allclose(res.as_numpy("scores"), scores, rtol=1e-6)
    r = res.get_response()
    assert r.id == "g-1" and r.model_version == "1"


def test_outputs_auth_and_shared_rate_limit(client, live, api_env):
    c, auth = client
    srv, key = live[0], live[4]
    inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(api_env.x[:1])
    res = c.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("label")], headers=dict(auth))
    assert [o.name for o in res.get_response().outputs] == ["label"] and res.as_numpy("scores") is None
    with pytest.raises(InferenceServerException, match="unknown output") as e:
        c.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("logits")], headers=dict(auth))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    for headers in ({}, {"authorization": "Bearer nope"}):
        with pytest.raises(InferenceServerException) as e:
            c.infer("digits", [inp], headers=headers)
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    bad = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
    bad.set_data_from_numpy(api_env.x[:1] + 5.0)  # outside the signed value range
    with pytest.raises(InferenceServerException, match="sanitizer") as e:
        c.infer("digits", [bad], headers=dict(auth))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    # the 40/minute budget is the key's, whichever transport spends it
    auth = {"authorization": f"Bearer {key}"}
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": api_env.x[0].ravel().tolist()}]}
    codes = []
    for i in range(45):
        if i % 2:
            r = requests.post(srv.url + "/v2/models/digits/infer", json=body, headers={"X-API-Key": key})
            codes.append(r.status_code)
        else:
            try:
                c.infer("digits", [inp], headers=dict(auth))
                codes.append(200)
            except InferenceServerException as exc:
                codes.append(exc.status())
    assert codes.count(200) == 40 and "StatusCode.RESOURCE_EXHAUSTED" in codes and 429 in codes


def test_grpc_stays_optional(api_env, bundle_v1):
    """Without grpcio the API imports and serves HTTP; only --grpc-port asks for the extra."""
    import subprocess
    import sys

    from servers import REPO, _env

    code = f"""
import sys
sys.modules["grpc"] = None  # as if edgeward[grpc] were not installed
import api, api.server, runtime_guard
from api import create_app
from api.server import ServerConfigError, ServerSettings, start_grpc
app = create_app(dict(bundle={str(bundle_v1)!r}, public_key={str(api_env.public_key_path)!r},
                      kek_file={str(api_env.kek_path)!r}))
assert start_grpc(app, ServerSettings(), app.extensions["edgeward"].config) is None
try:
    start_grpc(app, ServerSettings(grpc_port=0), app.extensions["edgeward"].config)
except ServerConfigError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "edgeward[grpc]" in out.stdout


def test_grpc_access_log(client, live, api_env):
    import json
    import time

    c, auth = client
    inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(api_env.x[:1])
    c.infer("digits", [inp], headers={**auth, "x-request-id": "grpc-log-1"})
    deadline = time.time() + 5
    while time.time() < deadline:
        hits = [json.loads(line) for line in live[0].log_path.read_text().splitlines()
                if line.startswith("{") and '"grpc-log-1"' in line]
        if hits:
            break
        time.sleep(0.1)
    [line] = hits
    assert line["transport"] == "grpc" and line["route"] == "/inference.GRPCInferenceService/ModelInfer"
    assert line["status"] == 200 and line["decision"] == "accepted" and line["client"]
    assert live[1] not in live[0].log_path.read_text()


def test_typed_contents_and_errors_without_tritonclient(live, guard, api_env):
    """``contents`` instead of ``raw_input_contents`` (tritonclient always sends raw), over a
    bare grpc channel with our message classes: one process may import both stubs."""
    import grpc

    from api.oip.proto import open_inference_pb2 as pb

    srv, key, port = live[:3]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
        md = (("authorization", f"Bearer {key}"), ("x-request-id", "typed-1"))
        x = api_env.x[:2]
        req = pb.ModelInferRequest(model_name="digits", model_version="1")
        t = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        t.contents.fp32_contents.extend(x.ravel().tolist())
        resp, call = infer.with_call(req, metadata=md)
        assert dict(call.initial_metadata())["x-request-id"] == "typed-1"
        labels, scores = _expected(guard, x)
        assert [o.name for o in resp.outputs] == ["label", "scores"]
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], "<i8"), labels)
        np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[1], "<f4").reshape(2, -1), scores,
                                   rtol=1e-6)
        del t.contents.fp32_contents[-1]  # one element short
        with pytest.raises(grpc.RpcError) as e:
            infer(req, metadata=md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "elements" in e.value.details()
