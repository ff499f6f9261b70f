"""KServe Open Inference Protocol v2 paths, so existing OIP clients work.

One model is served; its name is the bundle's ``model.name``. Tensors use
the OIP JSON form (``name``, ``shape``, ``datatype``, flat row-major
``data``). Errors are problem+json documents that also carry the OIP
``error`` member.
"""

from __future__ import annotations

import math

import numpy as np
from flask import Blueprint, Response, jsonify, request

from ..body import bad_body, media_type, parse_json_document, read_body, unsupported_type
from ..problems import ApiProblem
from ..service import describe
from ..state import state

bp = Blueprint("v2", __name__, url_prefix="/v2")
OIP_DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
              "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
              "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}


def _oip_error(exc: ApiProblem) -> ApiProblem:
    exc.extra.setdefault("error", exc.detail or exc.title)
    return exc


def _model_or_404(name: str):
    dep = state().holder.current()
    if dep is None:
        raise _oip_error(ApiProblem(503, "not-ready", "Service Unavailable", "no model is loaded yet",
                                    headers={"Retry-After": "5"}))
    if name != dep.name:
        raise _oip_error(ApiProblem(404, "unknown-model", "Not Found", f"no model named {name!r}"))
    return dep


@bp.get("")
def server_metadata() -> Response:
    return jsonify(name="edgeward", version="1", extensions=[])


@bp.get("/health/live")
def live() -> Response:
    return jsonify(live=True)


@bp.get("/health/ready")
def ready() -> Response:
    try:
        state().readiness()
    except ApiProblem:
        return jsonify(ready=False), 503
    return jsonify(ready=True), 200


@bp.get("/models/<name>")
def model_metadata(name: str) -> Response:
    dep = _model_or_404(name)
    d = describe(dep)
    return jsonify(
        name=dep.name, versions=[str(dep.version)], platform="onnxruntime",
        inputs=[{"name": d["input"]["name"], "datatype": "FP32",
                 "shape": [-1] + [-1 if s is None else s for s in d["input"]["sample_shape"]]}],
        outputs=[{"name": "label", "datatype": "INT64", "shape": [-1]},
                 {"name": "scores", "datatype": "FP32", "shape": [-1, d["output"]["num_classes"]]}],
    )


@bp.get("/models/<name>/ready")
def model_ready(name: str) -> Response:
    _model_or_404(name)
    return jsonify(name=name, ready=True)


def _tensor(doc: object) -> np.ndarray:
    """The single input tensor of an OIP infer request."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise bad_body("body must be {\"inputs\": [one tensor]}", "oip")
    t = doc["inputs"][0]
    if not isinstance(t, dict):
        raise bad_body("input tensor must be an object", "oip")
    shape, dtype, data = t.get("shape"), t.get("datatype"), t.get("data")
    if (not isinstance(shape, list) or not shape or len(shape) > 8
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 1 << 24 for s in shape)):
        raise bad_body("shape must be a list of positive integers", "oip-shape")
    if dtype not in OIP_DTYPES:
        raise bad_body(f"datatype must be one of {sorted(OIP_DTYPES)}", "oip-datatype")
    if not isinstance(data, list):
        raise bad_body("data must be a list of numbers", "oip")
    flat = data
    while flat and isinstance(flat[0], list):  # OIP allows nested data too
        flat = [v for row in flat if isinstance(row, list) for v in row]
    if math.prod(shape) != len(flat):
        raise bad_body("data length does not match shape", "oip-shape")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat):
        raise bad_body("data must contain only numbers", "json-type")
    try:
        arr = np.asarray(flat, dtype=np.float64)
    except (OverflowError, ValueError):
        raise bad_body("data must contain only finite numbers", "json-type") from None
    if not np.all(np.isfinite(arr)):
        raise bad_body("data must contain only finite numbers", "json-type")
    target = np.dtype(OIP_DTYPES[dtype])
    if target.kind in "iu":
        info = np.iinfo(target)
        if not (np.array_equal(arr, np.floor(arr)) and arr.min() >= info.min and arr.max() <= info.max):
            raise bad_body(f"data is not representable as {dtype}", "oip-datatype")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(target).astype(np.float32)  # the guard's schema is float32
    if not np.all(np.isfinite(arr)):
        raise bad_body(f"data is outside the {dtype} / float32 range", "json-type")
    return arr.reshape(shape)


@bp.post("/models/<name>/infer")
def infer(name: str) -> Response:
    st = state()
    try:
        client_id = st.client_id(request)
        dep = _model_or_404(name)
        if media_type(request) != "application/json":
            raise unsupported_type(media_type(request))
        doc = parse_json_document(read_body(request, st.config.max_body_bytes))
        x = _tensor(doc)
        ans = st.predict(dep, x, client_id)
    except ApiProblem as exc:
        raise _oip_error(exc) from None
    n = len(ans.labels)
    outputs = [{"name": "label", "datatype": "INT64", "shape": [n], "data": ans.labels}]
    if ans.scores is not None:
        c = len(ans.scores[0]) if n else 0
        outputs.append({"name": "scores", "datatype": "FP32", "shape": [n, c],
                        "data": [v for row in ans.scores for v in row]})
    body = {"model_name": dep.name, "model_version": str(dep.version), "outputs": outputs,
            "parameters": {"decision": ans.decision, "reasons": ",".join(ans.reasons)}}
    if isinstance(doc, dict) and isinstance(doc.get("id"), str):
        body["id"] = doc["id"][:256]
    resp = jsonify(body)
    resp.headers.extend(ans.headers)
    return resp

