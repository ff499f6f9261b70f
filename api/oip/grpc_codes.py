"""The gRPC status for each HTTP status the service layer answers with.

The service layer decides the HTTP status once (``api.service``); gRPC
translates it with this one table (the mapping gRPC's own HTTP gateway
uses), so a refusal reads the same on both transports. No grpc import:
codes are names of ``grpc.StatusCode`` members."""

from __future__ import annotations

GRPC_CODE_FOR_HTTP = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    409: "ABORTED", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 422: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}


def grpc_code_name(http_status: int) -> str:
    return GRPC_CODE_FOR_HTTP.get(http_status, "INTERNAL" if http_status >= 500 else "UNKNOWN")
