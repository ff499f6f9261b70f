"""KServe Open Inference Protocol v2 paths, so existing OIP clients work.

One model is served; its name is the bundle's ``model.name``. Tensors use
the OIP JSON form (``name``, ``shape``, ``datatype``, flat row-major
``data``). Errors are problem+json documents that also carry the OIP
``error`` member.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request

from ..body import MAX_ELEMENTS, bad_body, media_type, parse_json_document, read_body, unsupported_type
from ..problems import ApiProblem
from ..reload import Deployment
from ..service import describe
from ..state import state

bp = Blueprint("v2", __name__, url_prefix="/v2")
OIP_DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
              "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
              "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}


def _oip_error(exc: ApiProblem) -> ApiProblem:
    exc.extra.setdefault("error", exc.detail or exc.title)
    return exc


def _model_or_404(name: str) -> Deployment:
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
def ready() -> tuple[Response, int]:
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


MAX_RANK = 8


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _leaves(data: list[Any], shape: list[int]) -> list[Any]:
    """The row-major elements of ``data``: flat (exactly prod(shape) items) or nested
    exactly as ``shape`` (every level a list of the right length, leaves at the last
    level). Anything in between is refused, not silently flattened."""
    total = math.prod(shape)
    if not data or not isinstance(data[0], list):
        if len(data) != total:
            raise bad_body(f"data has {len(data)} elements, shape {shape} needs {total}", "oip-shape")
        if any(isinstance(v, list) for v in data):
            raise bad_body("data mixes lists and scalars", "oip-shape")
        return data
    out: list[Any] = []
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth == len(shape):
            if isinstance(node, list):
                raise bad_body(f"data nests deeper than shape {shape}", "oip-shape")
            out.append(node)
            continue
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise bad_body(f"nested data does not match shape {shape} at depth {depth}", "oip-shape")
        stack.extend((child, depth + 1) for child in reversed(node))
    return out


def _typed_array(flat: list[Any], dtype: str) -> np.ndarray:
    """Exact element checks for ``dtype``: integer types take JSON integers only, range
    checked on Python ints (no float64 round trip: 2**64-1 stays 2**64-1, and 2**64 is
    refused); float types take finite numbers within the type's range."""
    target: np.dtype[Any] = np.dtype(OIP_DTYPES[dtype])
    if target.kind in "iu":
        info = np.iinfo(target)
        lo, hi = int(info.min), int(info.max)
        for v in flat:
            if not _is_int(v):
                raise bad_body(f"{dtype} data must be JSON integers", "oip-datatype")
            if not lo <= v <= hi:
                raise bad_body(f"value {v} is outside the {dtype} range [{lo}, {hi}]", "oip-datatype")
        return np.array(flat, dtype=target)
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_body(f"{dtype} data must be JSON numbers", "json-type")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer past float64
        raise bad_body(f"data is outside the {dtype} range", "oip-datatype") from None
    with np.errstate(over="ignore", invalid="ignore"):
        arr = wide.astype(target)
    if not np.all(np.isfinite(arr)):
        raise bad_body(f"data must be finite numbers within the {dtype} range", "oip-datatype")
    return arr


def _tensor(doc: object, input_name: str) -> np.ndarray:
    """The single input tensor of an OIP infer request, checked exactly; the guard's
    schema is float32, so the typed values are converted last."""
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or len(doc["inputs"]) != 1:
        raise bad_body("body must be {\"inputs\": [one tensor]}", "oip")
    if "id" in doc and not isinstance(doc["id"], str):
        raise bad_body("id must be a string", "oip")
    for key in ("parameters",):
        if key in doc and not isinstance(doc[key], dict):
            raise bad_body(f"{key} must be an object", "oip")
    if "outputs" in doc and not isinstance(doc["outputs"], list):
        raise bad_body("outputs must be a list", "oip")
    t = doc["inputs"][0]
    if not isinstance(t, dict):
        raise bad_body("input tensor must be an object", "oip")
    name, shape, dtype, data = t.get("name"), t.get("shape"), t.get("datatype"), t.get("data")
    if not isinstance(name, str):
        raise bad_body("input tensor needs a string name", "oip-name")
    if name != input_name:
        raise bad_body(f"unknown input tensor {name[:64]!r}; the model's input is {input_name!r}", "oip-name")
    if "parameters" in t and not isinstance(t["parameters"], dict):
        raise bad_body("tensor parameters must be an object", "oip")
    if (not isinstance(shape, list) or not shape or len(shape) > MAX_RANK
            or not all(_is_int(s) and 0 < s <= 1 << 24 for s in shape)):
        raise bad_body("shape must be a list of 1 to 8 positive integers", "oip-shape")
    if not isinstance(dtype, str) or dtype not in OIP_DTYPES:
        raise bad_body(f"datatype must be one of {sorted(OIP_DTYPES)}", "oip-datatype")
    if not isinstance(data, list):
        raise bad_body("data must be a list of numbers", "oip")
    if math.prod(shape) > MAX_ELEMENTS:
        raise bad_body("tensor has too many elements", "oip-shape")
    arr = _typed_array(_leaves(data, shape), dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise bad_body("data is outside the float32 range the model takes", "oip-datatype")
    return out.reshape(shape)


@bp.post("/models/<name>/infer")
def infer(name: str) -> Response:
    st = state()
    try:
        client_id = st.client_id(request)
        dep = _model_or_404(name)
        if media_type(request) != "application/json":
            raise unsupported_type(media_type(request))
        doc = parse_json_document(read_body(request, st.config.max_body_bytes))
        x = _tensor(doc, dep.model.input_name)
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
    if isinstance(doc.get("id"), str):
        body["id"] = doc["id"][:256]
    resp = jsonify(body)
    resp.headers.extend(ans.headers)
    return resp

