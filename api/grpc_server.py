"""OIP v2 over gRPC (``inference.GRPCInferenceService``), next to the HTTP server.

Optional: needs the ``edgeward[grpc]`` extra (grpcio + protobuf); nothing
else in ``api`` imports this module, so the HTTP server runs without it.
The message classes in ``api.oip.proto`` are generated from our copy of
the protocol's message definitions (``make grpc-stubs``), not taken from
tritonclient, so serving never depends on a client library, and a process
may import both.

It serves the same app as HTTP: the same ``ApiState`` (guard, hot-swapped
deployment, API keys via the ``authorization`` metadata, rate limits keyed
like HTTP's client ids), the same Prometheus registry (requests counted
under the RPC's path, e.g. ``/inference.GRPCInferenceService/ModelInfer``,
with the HTTP-equivalent status) and the same OIP statistics. Refusals are
the service layer's ApiProblem, translated by ``api.oip.grpc_codes``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np

from .access import AccessLog, request_id
from .oip import infer as oip
from .oip.grpc_codes import grpc_code_name
from .oip.proto import open_inference_pb2 as pb
from .oip.stats import InferenceStats
from .oip.tensors import OIP_DTYPES, check_header, from_raw, to_model_input, to_raw, typed_array
from .problems import ApiProblem
from .state import ApiState

log = logging.getLogger("api.grpc")
SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
ENDPOINTS = frozenset(f"/{SERVICE}/{m}" for m in METHODS)
# InferTensorContents field holding each datatype (FP16 has none: raw contents only)
CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents",
                  "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                  "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
                  "UINT64": "uint64_contents"}
R = TypeVar("R")


def _bearer(metadata: dict[str, str]) -> str | None:
    auth = metadata.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return metadata.get("x-api-key") or None


def _peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` -> the address, as HTTP's remote_addr."""
    _, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0]
    return host.strip("[]") or "unknown"


class Servicer:
    """The six RPCs; ``handler()`` registers them under the protocol's service name."""

    def __init__(self, st: ApiState, stats: InferenceStats, access_log: AccessLog) -> None:
        self.st, self.stats, self.access_log = st, stats, access_log

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, method: str, context: grpc.ServicerContext, body: Callable[[dict[str, Any]], R]) -> R:
        """Run ``body(notes)``; ApiProblem -> the table's status code with the problem's detail
        (Retry-After and RateLimit-* as trailing metadata); count and log it like HTTP does,
        with the ``x-request-id`` metadata (validated, else generated) sent back."""
        t0 = time.perf_counter()
        status = 200
        md = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
        rid = request_id(md.get("x-request-id"))
        context.send_initial_metadata((("x-request-id", rid),))
        notes: dict[str, Any] = {}
        try:
            return body(notes)
        except ApiProblem as exc:
            status = exc.status
            trailers = tuple((k.lower(), v) for k, v in exc.headers.items()
                             if k.lower() in ("retry-after",) or "ratelimit" in k.lower())
            if trailers:
                context.set_trailing_metadata(trailers)
            context.abort(getattr(grpc.StatusCode, grpc_code_name(exc.status)), exc.detail or exc.title)
            raise  # abort() raises; this only satisfies the type checker
        except Exception:  # never exception text to the client (as HTTP's 500s)
            status = 500
            log.exception("unhandled error in %s", method)
            context.abort(grpc.StatusCode.INTERNAL, "the server failed to handle this request; see server logs")
            raise
        finally:
            latency = time.perf_counter() - t0
            self.st.metrics.observe_request(f"/{SERVICE}/{method}", "POST", status, latency)
            self.access_log.write(rid=rid, transport="grpc", route=f"/{SERVICE}/{method}", method="POST",
                                  status=status, latency_s=latency, notes=notes)

    def _client_id(self, context: grpc.ServicerContext) -> str:
        if self.st.keys is not None:
            md = {k.lower(): v for k, v in context.invocation_metadata() if isinstance(v, str)}
            key_id = self.st.keys.identify(_bearer(md))
            if key_id is None:
                raise ApiProblem(401, "unauthorized", "Unauthorized",
                                 "a valid API key is required (metadata authorization: Bearer <key>)")
            return "key:" + key_id
        return "addr:" + _peer_host(context.peer())

    # -- health and metadata ----------------------------------------------------------------
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call("ServerLive", context, lambda _notes: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_notes: dict[str, Any]) -> Any:
            try:
                self.st.readiness()
            except ApiProblem:
                return pb.ServerReadyResponse(ready=False)
            return pb.ServerReadyResponse(ready=True)
        return self._call("ServerReady", context, body)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(_notes: dict[str, Any]) -> Any:
            try:
                oip.resolve(self.st, request.name, request.version)
            except ApiProblem as exc:
                if exc.status == 404:
                    return pb.ModelReadyResponse(ready=False)
                raise
            return pb.ModelReadyResponse(ready=True)
        return self._call("ModelReady", context, body)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        from .routes.v2 import EXTENSIONS

        return self._call("ServerMetadata", context, lambda _notes: pb.ServerMetadataResponse(
            name="edgeward", version="1", extensions=[e for e in EXTENSIONS if e != "binary_tensor_data"]))

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        from .routes.v2 import model_metadata_doc

        def body(_notes: dict[str, Any]) -> Any:
            doc = model_metadata_doc(oip.resolve(self.st, request.name, request.version))
            tm = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=doc["name"], versions=doc["versions"], platform=doc["platform"],
                inputs=[tm(**t) for t in doc["inputs"]], outputs=[tm(**t) for t in doc["outputs"]])
        return self._call("ModelMetadata", context, body)

    # -- inference ---------------------------------------------------------------------------
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        def body(notes: dict[str, Any]) -> Any:
            client_id = self._client_id(context)
            dep = oip.resolve(self.st, request.model_name, request.model_version)
            try:
                req = _infer_request(request, dep.model.input_name, self.st.config.max_body_bytes)
            except ApiProblem as exc:
                raise oip.oip_problem(exc) from None
            return _infer_response(oip.run(self.st, self.stats, dep, req, client_id, notes, "grpc"))
        return self._call("ModelInfer", context, body)


def _infer_request(request: Any, input_name: str, max_bytes: int) -> oip.InferRequest:
    from .body import bad_body

    if len(request.inputs) != 1:
        raise bad_body("the request must carry exactly one input tensor", "oip")
    t = request.inputs[0]
    shape, dtype = check_header(t.name, list(t.shape), t.datatype, input_name)
    raw = list(request.raw_input_contents)
    if raw:
        if len(raw) != 1:
            raise bad_body("raw_input_contents must hold one entry per input", "oip-binary")
        if len(raw[0]) > max_bytes:
            raise ApiProblem(413, "payload-too-large", "Payload Too Large",
                             f"input is over the {max_bytes}-byte limit")
        if t.HasField("contents"):
            raise bad_body("an input has either contents or raw_input_contents, not both", "oip-binary")
        arr = from_raw(raw[0], shape, dtype)
    else:
        field = CONTENTS_FIELD.get(dtype)
        if field is None:
            raise bad_body(f"{dtype} data must be sent as raw_input_contents", "oip-datatype")
        values = list(getattr(t.contents, field))
        if len(values) != int(np.prod(shape)):
            raise bad_body(f"contents have {len(values)} elements, shape {shape} needs {int(np.prod(shape))}",
                           "oip-shape")
        arr = typed_array(values, dtype).reshape(shape)
    wanted: list[tuple[object, bool]] = []
    for o in request.outputs:
        if "classification" in o.parameters:
            raise bad_body("the classification extension is not supported; ask for 'label'", "oip-output")
        wanted.append((o.name, True))
    return oip.InferRequest(to_model_input(arr).reshape(shape), oip.requested_outputs(wanted, True),
                            oip.check_request_id(request.id or None))


def _infer_response(res: oip.InferResponse) -> Any:
    """Outputs as raw_output_contents (what Triton answers; tritonclient reads either)."""
    out = pb.ModelInferResponse(model_name=res.model_name, model_version=res.model_version, id=res.request_id)
    out.parameters["decision"].string_param = res.decision
    out.parameters["reasons"].string_param = ",".join(res.reasons)
    for o in res.outputs:
        assert o.datatype in OIP_DTYPES
        out.outputs.add(name=o.name, datatype=o.datatype, shape=list(o.array.shape))
        out.raw_output_contents.append(to_raw(o.array, o.datatype))
    return out


MESSAGES: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


def handler(servicer: Servicer) -> Any:
    """``/inference.GRPCInferenceService/<Method>`` -> the servicer, with our message classes
    (the protocol's wire format; see api/oip/proto/open_inference.proto for why the
    protobuf package is our own)."""
    methods = {name: grpc.unary_unary_rpc_method_handler(
        getattr(servicer, name), request_deserializer=req.FromString,
        response_serializer=resp.SerializeToString) for name, (req, resp) in MESSAGES.items()}
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class GrpcServer:
    """A grpc.server bound to ``host:port`` serving ``Servicer`` on a thread pool."""

    def __init__(self, st: ApiState, stats: InferenceStats, access_log: AccessLog, host: str, port: int,
                 threads: int, max_message_bytes: int) -> None:
        st.metrics.allow_endpoints(st.metrics.endpoints_allowed | ENDPOINTS)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", max_message_bytes + 65536),
                     ("grpc.so_reuseport", 1)])
        self.server.add_generic_rpc_handlers((handler(Servicer(st, stats, access_log)),))
        shown = f"[{host}]" if ":" in host else host
        self.port = self.server.add_insecure_port(f"{shown}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {shown}:{port}")

    def start(self) -> "GrpcServer":
        self.server.start()
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait(grace_s + 1)
