"""The OpenAPI 3.0 document of every endpoint (served at ``/openapi.json``).

Written by hand next to the routes and checked by a schemathesis run in the
tests (every documented status, content type, header and body schema is
exercised against the live server), so it cannot silently drift from them.
Security requirements are included only when the app has API keys / an
admin token configured.
"""

from __future__ import annotations

from typing import Any

PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {PROBLEM: {"schema": _ref("Problem")}}}
    if headers:
        out["headers"] = headers
    return out


def _json(description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


_INT_HEADER = {"schema": {"type": "integer", "minimum": 0}}


def _rate_headers(prefix: str) -> dict[str, Any]:
    return {prefix + name: {**_INT_HEADER, "description": desc}
            for name, desc in (("Limit", "requests allowed in the window"),
                               ("Remaining", "requests left in the window"),
                               ("Reset", "seconds until the window frees a request"))}


RATE_HEADERS = _rate_headers("RateLimit-")  # on 429s; on every answer with rate_limit_headers="always"
LEGACY_RATE_HEADERS = _rate_headers("X-RateLimit-")  # also on 429s, for older clients
RETRY_AFTER = {"Retry-After": {**_INT_HEADER, "required": True, "description": "seconds to wait"}}


SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "check": {"type": "string", "description": "name of the failed check"},
            "reasons": {"type": "array", "items": {"type": "string"}},
            "retry_after": {"type": "integer", "minimum": 1},
            "error": {"type": "string", "description": "KServe v2 error message (v2 paths only)"},
        },
    },
    "NumberTree": {
        "description": "a number or a (nested) list of numbers",
        "oneOf": [{"type": "number"}, {"type": "array", "items": _ref("NumberTree"), "minItems": 1}],
    },
    "PredictRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {"type": "array", "minItems": 1, "items": _ref("NumberTree"),
                       "description": "one sample or a batch [N, ...sample_shape]"},
        },
    },
    "PredictResponse": {
        "type": "object",
        "required": ["model", "decision", "reasons", "labels", "scores"],
        "properties": {
            "model": _ref("ModelRef"),
            "decision": {"type": "string", "enum": ["accepted", "flagged"]},
            "reasons": {"type": "array", "items": {"type": "string"}},
            "labels": {"type": "array", "items": {"type": "integer"}},
            "scores": {"type": "array", "nullable": True,
                       "items": {"type": "array", "items": {"type": "number"}}},
        },
    },
    "ModelRef": {
        "type": "object",
        "required": ["name", "version"],
        "properties": {"name": {"type": "string"}, "version": {"type": "integer"}},
    },
    "ModelInfo": {
        "type": "object",
        "required": ["name", "version", "manifest_sha256", "input", "output", "anomaly_gate", "rate_limit"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "integer"},
            "manifest_sha256": {"type": "string"},
            "created_at": {"type": "integer", "nullable": True},
            "expires_at": {"type": "integer", "nullable": True},
            "input": {
                "type": "object",
                "required": ["name", "sample_shape", "dtype", "max_batch"],
                "properties": {
                    "name": {"type": "string"},
                    "sample_shape": {"type": "array", "items": {"type": "integer", "nullable": True}},
                    "dtype": {"type": "string"},
                    "max_batch": {"type": "integer"},
                    "value_range": {"type": "array", "nullable": True, "items": {"type": "number"}},
                    "out_of_range": {"type": "string", "enum": ["reject", "clip"]},
                    "max_bytes": {"type": "integer"},
                },
            },
            "output": {
                "type": "object",
                "required": ["num_classes", "policy"],
                "properties": {"num_classes": {"type": "integer"}, "policy": {"type": "string"}},
            },
            "anomaly_gate": {"type": "string", "enum": ["off", "flag", "reject"]},
            "rate_limit": {
                "type": "object",
                "properties": {"per_client": {"type": "string", "nullable": True},
                               "global": {"type": "string", "nullable": True}},
            },
        },
    },
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string", "enum": ["ok"]}, "pid": {"type": "integer"}}},
    "Ready": {"type": "object", "required": ["status", "model"],
              "properties": {"status": {"type": "string", "enum": ["ready"]}, "model": _ref("ModelRef")}},
    "ReloadRequest": {"type": "object",
                      "properties": {"path": {"type": "string",
                                              "description": "bundle path on the server"}}},
    "ReloadResult": {
        "type": "object",
        "required": ["outcome", "version", "manifest_sha256"],
        "properties": {
            "outcome": {"type": "string", "enum": ["swapped", "unchanged"]},
            "version": {"type": "integer"},
            "previous_version": {"type": "integer", "nullable": True},
            "manifest_sha256": {"type": "string"},
        },
    },
    "AdminStatus": {"type": "object", "required": ["ready", "current", "probation"],
                    "properties": {"ready": {"type": "boolean"},
                                   "current": {"type": "object", "nullable": True},
                                   "probation": {"type": "object", "nullable": True},
                                   "last_event": {"type": "object", "nullable": True},
                                   "update": {"type": "object", "description": "with --update-from: "
                                              "source, device id, slots A/B, rolled-back releases, last check"}}},
    "UpdateCheck": {"type": "object", "required": ["outcome", "at"],
                    "properties": {"outcome": {"type": "string",
                                               "enum": ["installed", "current", "none", "refused"]},
                                   "at": {"type": "number"}, "check": {"type": "string"},
                                   "version": {"type": "integer"}}},
    "V2ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"],
                         "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                        "extensions": {"type": "array", "items": {"type": "string"}}}},
    "V2Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "V2Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "V2ModelReady": {"type": "object", "required": ["name", "ready"],
                     "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "V2TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"],
                         "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                        "shape": {"type": "array", "items": {"type": "integer"}}}},
    "V2ModelMetadata": {
        "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {"name": {"type": "string"},
                       "versions": {"type": "array", "items": {"type": "string"}},
                       "platform": {"type": "string"},
                       "inputs": {"type": "array", "items": _ref("V2TensorMetadata")},
                       "outputs": {"type": "array", "items": _ref("V2TensorMetadata")}},
    },
    "V2ModelConfig": {"type": "object", "required": ["name", "platform", "max_batch_size", "input", "output"],
                      "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                                     "max_batch_size": {"type": "integer"},
                                     "input": {"type": "array", "items": {"type": "object"}},
                                     "output": {"type": "array", "items": {"type": "object"}}}},
    "V2Stats": {"type": "object", "required": ["model_stats"],
                "properties": {"model_stats": {"type": "array", "items": {
                    "type": "object", "required": ["name", "version", "inference_count", "inference_stats"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "inference_count": {"type": "integer"},
                                   "execution_count": {"type": "integer"},
                                   "last_inference": {"type": "integer"},
                                   "inference_stats": {"type": "object"}}}}}},
    "V2IndexEntry": {"type": "object", "required": ["name", "version", "state"],
                     "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                    "state": {"type": "string", "enum": ["READY"]}}},
    "V2Tensor": {
        "type": "object", "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}},
            "datatype": {"type": "string", "enum": ["FP32", "FP64", "FP16", "INT8", "INT16", "INT32",
                                                    "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]},
            "data": {"type": "array", "items": _ref("NumberTree")},
        },
    },
    "V2InferRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {"id": {"type": "string"},
                       "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("V2Tensor")}},
    },
    "V2InferResponse": {
        "type": "object", "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name", "shape", "datatype", "data"],
                "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                               "shape": {"type": "array", "items": {"type": "integer"}},
                               "data": {"type": "array", "items": {"type": "number"}}}}},
            "parameters": {"type": "object"},
        },
    },
}


def openapi_document(*, api_keys: bool = False, admin: bool = False) -> dict[str, Any]:
    """Build the document; ``api_keys``/``admin`` add the matching security."""
    key_sec: list[dict[str, list[str]]] = [{"apiKey": []}, {"bearer": []}] if api_keys else []
    admin_sec: list[dict[str, list[str]]] = [{"adminToken": []}]
    not_ready = _problem("no model loaded yet, the rate-limit storage is unreachable "
                         "(``check``: ``rate-limit-storage``) or the server is draining", RETRY_AFTER)
    unauthorized = _problem("missing or invalid API key")
    predict_errors = {
        "400": _problem("invalid body or sanitizer rejection (``check`` names the failed check)"),
        **({"401": unauthorized} if api_keys else {}),
        "413": _problem("body larger than the configured limit"),
        "415": _problem("content type is not accepted"),
        "422": _problem("the anomaly gate rejected the input"),
        "429": _problem("rate limited", {**RETRY_AFTER, **RATE_HEADERS, **LEGACY_RATE_HEADERS}),
        "500": _problem("the model's output for a valid input is not finite (``model-output-invalid``)"),
        "503": not_ready,
    }

    def sec(op: dict[str, Any], requirement: list[dict[str, list[str]]]) -> dict[str, Any]:
        if requirement:
            op["security"] = requirement
        return op

    paths: dict[str, Any] = {
        "/v1/predict": {"post": sec({
            "operationId": "predict",
            "summary": "Guarded prediction for one sample or a batch",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("PredictRequest")},
                "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
            }},
            "responses": {"200": _json("prediction (decision accepted or flagged)",
                                       _ref("PredictResponse"), RATE_HEADERS),
                          **predict_errors},
        }, key_sec)},
        "/v1/model": {"get": {
            "operationId": "modelInfo",
            "summary": "Model name, version, input schema and output policy (never weights or keys)",
            "responses": {"200": _json("model metadata", _ref("ModelInfo")), "503": not_ready},
        }},
        "/healthz": {"get": {"operationId": "healthz", "summary": "Liveness",
                             "responses": {"200": _json("process is up", _ref("Health"))}}},
        "/readyz": {"get": {"operationId": "readyz", "summary": "Readiness (a verified model is served)",
                            "responses": {"200": _json("ready", _ref("Ready")), "503": not_ready}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                             "responses": {"200": {"description": "Prometheus text format",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                  "responses": {"200": _json("OpenAPI document", {"type": "object"})}}},
        "/v1/admin/reload": {"post": sec({
            "operationId": "adminReload",
            "summary": "Hot update: verify, smoke-test and swap in a bundle (rolls back on failure)",
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": _ref("ReloadRequest")}}},
            "responses": {
                "200": _json("swapped (or already serving this bundle)", _ref("ReloadResult")),
                "400": _problem("invalid body"),
                "401": _problem("admin token missing"),
                "403": _problem("not the admin token, or admin endpoints disabled"),
                "409": _problem("bundle refused (``check`` names why); the old bundle keeps serving"),
                "413": _problem("body larger than the configured limit"),
                "415": _problem("content type is not accepted"),
            },
        }, admin_sec)},
        "/v1/admin/status": {"get": sec({
            "operationId": "adminStatus",
            "summary": "Served bundle, probation state and last hot-update event",
            "responses": {"200": _json("status", _ref("AdminStatus")),
                          "401": _problem("admin token missing"),
                          "403": _problem("not the admin token, or admin endpoints disabled")},
        }, admin_sec)},
        "/v1/admin/update": {"post": sec({
            "operationId": "adminUpdate",
            "summary": "Check the update source now (--update-from); refusals keep the model serving",
            "responses": {"200": _json("what the check did (``check`` names a refusal)", _ref("UpdateCheck")),
                          "401": _problem("admin token missing"),
                          "403": _problem("not the admin token, or admin endpoints disabled"),
                          "404": _problem("this server has no update source")},
        }, admin_sec)},
        "/v2": {"get": {"operationId": "v2ServerMetadata", "summary": "KServe v2 server metadata",
                        "responses": {"200": _json("server metadata", _ref("V2ServerMetadata"))}}},
        "/v2/health/live": {"get": {"operationId": "v2Live", "summary": "KServe v2 liveness",
                                    "responses": {"200": _json("live", _ref("V2Live"))}}},
        "/v2/health/ready": {"get": {"operationId": "v2Ready", "summary": "KServe v2 readiness",
                                     "responses": {"200": _json("ready", _ref("V2Ready")),
                                                   "503": _json("not ready", _ref("V2Ready"))}}},
    }
    name_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    version_param = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                      "description": "the served bundle version; any other is a 404"}]
    unknown = _problem("unknown model name or version")
    infer_ok = _json("inference result", _ref("V2InferResponse"), RATE_HEADERS)
    infer_ok["content"]["application/octet-stream"] = {
        "schema": {"type": "string", "format": "binary"},
        "description": "binary tensor data extension: JSON header of Inference-Header-Content-Length "
                       "bytes, then the binary outputs"}
    infer_ok["headers"] = {**RATE_HEADERS, "Inference-Header-Content-Length": {
        **_INT_HEADER, "description": "bytes of JSON before the binary outputs (binary answers only)"}}
    for prefix, params, suffix in (("/v2/models/{name}", name_param, ""),
                                   ("/v2/models/{name}/versions/{version}", name_param + version_param,
                                    "Version")):
        paths[prefix] = {"get": {
            "operationId": "v2ModelMetadata" + suffix, "summary": "KServe v2 model metadata",
            "parameters": params,
            "responses": {"200": _json("model metadata", _ref("V2ModelMetadata")),
                          "404": unknown, "503": not_ready}}}
        paths[prefix + "/ready"] = {"get": {
            "operationId": "v2ModelReady" + suffix, "summary": "KServe v2 model readiness",
            "parameters": params,
            "responses": {"200": _json("model ready", _ref("V2ModelReady")),
                          "404": unknown, "503": not_ready}}}
        paths[prefix + "/config"] = {"get": {
            "operationId": "v2ModelConfig" + suffix, "summary": "model configuration extension",
            "parameters": params,
            "responses": {"200": _json("model configuration", _ref("V2ModelConfig")),
                          "404": unknown, "503": not_ready}}}
        paths[prefix + "/stats"] = {"get": {
            "operationId": "v2ModelStats" + suffix, "summary": "statistics extension, one model",
            "parameters": params,
            "responses": {"200": _json("statistics", _ref("V2Stats")), "404": unknown, "503": not_ready}}}
        paths[prefix + "/infer"] = {"post": sec({
            "operationId": "v2Infer" + suffix, "summary": "KServe v2 inference (JSON or binary tensor data)",
            "parameters": params,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("V2InferRequest")}}},
            "responses": {"200": infer_ok, "404": unknown, **predict_errors}}, key_sec)}
    paths["/v2/models/stats"] = {"get": {
        "operationId": "v2Stats", "summary": "statistics extension, every model",
        "responses": {"200": _json("statistics", _ref("V2Stats"))}}}
    paths["/v2/repository/index"] = {"post": {
        "operationId": "v2RepositoryIndex", "summary": "model repository index",
        "responses": {"200": _json("the served model", {"type": "array", "items": _ref("V2IndexEntry")}),
                      "400": _problem("body is not JSON")}}}

    schemes: dict[str, Any] = {"adminToken": {"type": "http", "scheme": "bearer",
                                              "description": "the separate admin token"}}
    if api_keys:
        schemes["apiKey"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
        schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": "API key as bearer token"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgeward guarded inference API", "version": "1.0.0",
                 "description": "Errors are RFC 9457 problem details (application/problem+json)."},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": schemes},
    }
