"""KServe Open Inference Protocol v2 over HTTP, as OIP clients (``tritonclient.http``) use it.

One model is served; its name is the bundle's ``model.name`` and its only
version the bundle's version, so ``/v2/models/<name>/...`` and
``/v2/models/<name>/versions/<version>/...`` answer alike (another version
is a 404). Inference takes JSON with or without a Content-Type and the
binary tensor data extension both ways (``Inference-Header-Content-Length``,
``binary_data_size``, ``binary_data``, ``binary_data_output``). Errors are
problem+json documents that also carry the OIP ``error`` member.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from ..access import request_notes
from ..body import bad_body, media_type, parse_json_document, read_body, unsupported_type
from ..oip import infer as oip
from ..oip.stats import InferenceStats
from ..oip.tensors import check_header, from_raw, leaves, to_model_input, to_raw, typed_array
from ..problems import ApiProblem
from ..reload import Deployment
from ..service import describe
from ..state import state

bp = Blueprint("v2", __name__, url_prefix="/v2")
STATS_EXT = "edgeward.oip_stats"
HEADER_LENGTH = "Inference-Header-Content-Length"
# JSON, or the binary extension's JSON header + tensor bytes; tritonclient sends none.
INFER_TYPES = frozenset({"", "application/json", "application/octet-stream",
                         "application/vnd.sagemaker-triton.binary+json"})
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]


def stats() -> InferenceStats:
    s: InferenceStats = current_app.extensions[STATS_EXT]
    return s


def _versioned(rule: str, methods: list[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a view under ``/models/<name>{rule}`` and ``/models/<name>/versions/<version>{rule}``."""
    def deco(view: Callable[..., Any]) -> Callable[..., Any]:
        bp.add_url_rule(f"/models/<name>{rule}", view_func=view, methods=methods, defaults={"version": None})
        bp.add_url_rule(f"/models/<name>/versions/<version>{rule}", view_func=view, methods=methods)
        return view
    return deco


def _model(name: str, version: str | None) -> Deployment:
    return oip.resolve(state(), name, version)


@bp.get("")
def server_metadata() -> Response:
    return jsonify(name="edgeward", version="1", extensions=EXTENSIONS)


@bp.get("/health/live")
def live() -> Response:
    return jsonify(live=True)


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    try:
        state().readiness()
    except ApiProblem:
        return jsonify(ready=False), 503
    return jsonify(ready=True), 200


def model_metadata_doc(dep: Deployment) -> dict[str, Any]:
    d = describe(dep)
    return {
        "name": dep.name, "versions": [str(dep.version)], "platform": "onnxruntime",
        "inputs": [{"name": d["input"]["name"], "datatype": "FP32",
                    "shape": [-1] + [-1 if s is None else s for s in d["input"]["sample_shape"]]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "scores", "datatype": "FP32", "shape": [-1, d["output"]["num_classes"]]}],
    }


@_versioned("", ["GET"])
def model_metadata(name: str, version: str | None) -> Response:
    return jsonify(model_metadata_doc(_model(name, version)))


@_versioned("/ready", ["GET"])
def model_ready(name: str, version: str | None) -> Response:
    _model(name, version)
    return jsonify(name=name, ready=True)


@_versioned("/config", ["GET"])
def model_config(name: str, version: str | None) -> Response:
    """The model configuration extension's document for the one model (Triton field names)."""
    dep = _model(name, version)
    meta = model_metadata_doc(dep)

    def dims(shape: list[int]) -> list[int]:
        return shape[1:]  # the batch dimension is max_batch_size's
    return jsonify(
        name=dep.name, platform="onnxruntime_onnx", backend="onnxruntime",
        max_batch_size=int(dep.model.config.input.max_batch),
        input=[{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": dims(t["shape"])}
               for t in meta["inputs"]],
        output=[{"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": dims(t["shape"])}
                for t in meta["outputs"]],
        version_policy={"specific": {"versions": [dep.version]}},
        parameters={"output_policy": {"string_value": str(dep.model.config.output.policy)}},
    )


@bp.get("/models/stats")
def all_stats() -> Response:
    # unauthenticated, like /metrics, which already exposes the same counts
    dep = state().holder.current()
    models = [] if dep is None else [stats().model_stats(dep.name, str(dep.version))]
    return jsonify(model_stats=models)


@_versioned("/stats", ["GET"])
def model_stats(name: str, version: str | None) -> Response:
    dep = _model(name, version)
    return jsonify(model_stats=[stats().model_stats(dep.name, str(dep.version))])


@bp.post("/repository/index")
def repository_index() -> Response:
    """The model repository extension's index: the one model, ready or not."""
    if request.content_length:
        parse_json_document(read_body(request, 4096))  # tritonclient sends {} or nothing
    dep = state().holder.current()
    if dep is None:
        return jsonify([])
    return jsonify([{"name": dep.name, "version": str(dep.version), "state": "READY"}])


def _split_body(data: bytes) -> tuple[bytes, memoryview]:
    """JSON header and binary tail of an infer body (the binary extension's framing)."""
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return data, memoryview(b"")
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if not 0 < n <= len(data):
        raise bad_body(f"{HEADER_LENGTH} must be an integer between 1 and the body size", "oip-binary")
    return data[:n], memoryview(data)[n:]


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    p = obj.get("parameters", {})
    if not isinstance(p, dict):
        raise bad_body(f"{where} parameters must be an object", "oip")
    return p


def parse_infer(doc: object, tail: memoryview, input_name: str) -> oip.InferRequest:
    """The OIP JSON infer request (plus binary tail) -> a typed request."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise bad_body("body must be {\"inputs\": [one tensor]}", "oip")
    request_id = oip.check_request_id(doc.get("id"))
    params = _params(doc, "request")
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise bad_body("binary_data_output must be a boolean", "oip")
    t = doc["inputs"][0]
    if not isinstance(t, dict):
        raise bad_body("input tensor must be an object", "oip")
    shape, dtype = check_header(t.get("name"), t.get("shape"), t.get("datatype"), input_name)
    size = _params(t, "tensor").get("binary_data_size")
    if size is None:
        if len(tail):
            raise bad_body("binary data sent but no input declares binary_data_size", "oip-binary")
        data = t.get("data")
        if not isinstance(data, list):
            raise bad_body("data must be a list of numbers", "oip")
        arr = typed_array(leaves(data, shape), dtype)
    else:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
            raise bad_body(f"binary_data_size must equal the {len(tail)} bytes after the JSON header",
                           "oip-binary")
        if "data" in t:
            raise bad_body("a tensor has either data or binary_data_size, not both", "oip-binary")
        arr = from_raw(tail, shape, dtype)
    outs = doc.get("outputs", [])
    if not isinstance(outs, list) or not all(isinstance(o, dict) for o in outs):
        raise bad_body("outputs must be a list of objects", "oip")
    wanted: list[tuple[object, bool]] = []
    for o in outs:
        p = _params(o, "output")
        if "classification" in p:
            raise bad_body("the classification extension is not supported; ask for 'label'", "oip-output")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise bad_body("binary_data must be a boolean", "oip")
        wanted.append((o.get("name"), binary))
    return oip.InferRequest(to_model_input(arr).reshape(shape), oip.requested_outputs(wanted, default_binary),
                            request_id)


def infer_response(res: oip.InferResponse) -> Response:
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for o in res.outputs:
        t: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.array.shape)}
        if o.binary:
            blob = to_raw(o.array, o.datatype)
            blobs.append(blob)
            t["parameters"] = {"binary_data_size": len(blob)}
        else:
            t["data"] = o.array.reshape(-1).tolist()
        outputs.append(t)
    body: dict[str, Any] = {"model_name": res.model_name, "model_version": res.model_version,
                            "outputs": outputs,
                            "parameters": {"decision": res.decision, "reasons": ",".join(res.reasons)}}
    if res.request_id:
        body["id"] = res.request_id
    header = json.dumps(body).encode()
    if blobs:
        resp = Response(b"".join([header, *blobs]), 200, content_type="application/octet-stream")
        resp.headers[HEADER_LENGTH] = str(len(header))
    else:
        resp = Response(header, 200, content_type="application/json")
    resp.headers.extend(res.headers)
    return resp


@_versioned("/infer", ["POST"])
def infer(name: str, version: str | None) -> Response:
    st = state()
    try:
        client_id = st.client_id(request)
        dep = _model(name, version)
        mt = media_type(request)
        if mt not in INFER_TYPES:
            raise unsupported_type(mt)
        head, tail = _split_body(read_body(request, st.config.max_body_bytes))
        req = parse_infer(parse_json_document(head), tail, dep.model.input_name)
    except ApiProblem as exc:
        raise oip.oip_problem(exc) from None
    notes = request_notes()
    return infer_response(oip.run(st, stats(), dep, req, client_id, notes, "http"))
