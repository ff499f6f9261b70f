"""Request IDs and the structured access log.

Every HTTP request gets an ``X-Request-ID``: the client's if it is a plain
token (``[A-Za-z0-9._:-]``, 1 to 128 characters; anything else is replaced,
never echoed), else a fresh random 128-bit id (32 hex digits). It is returned on the answer and written
to the access log, one JSON object per line on the ``edgeward.access``
logger (stderr): time, request id, transport, route template (never the raw
path), method, status, guard decision, latency and a keyed hash of the
client id. Inputs, bodies, keys and raw client addresses are never logged;
the hash key is random per process, so the hash links one client's requests
within a process without being reversible by hashing candidate addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

from flask import Request, request

from .problems import ApiProblem

if TYPE_CHECKING:
    from .reload import Deployment
    from .service import Answer
    from .state import ApiState

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
log = logging.getLogger("edgeward.access")


def request_id(presented: str | None) -> str:
    if presented and REQUEST_ID_RE.fullmatch(presented):
        return presented
    return secrets.token_hex(16)  # as random as a UUID4's hex, without building a UUID object


def decision_of(exc: ApiProblem) -> str:
    """The guard's decision behind a refusal (its verdict, ``api.decisions``); a
    rate-limit storage outage is ``unavailable``, anything else ``error``."""
    if exc.verdict is not None:
        return exc.verdict.decision.value
    return "unavailable" if exc.slug == "rate-limit-storage-unavailable" else "error"


# One encoder for the process: ``json.dumps(..., separators=...)`` builds a new one per line.
_LINE = json.JSONEncoder(separators=(",", ":"))
# Distinct client ids whose keyed hash is remembered (API key ids or addresses: few per device).
CLIENT_HASH_CACHE = 4096


class AccessLog:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._key = secrets.token_bytes(16)
        # per instance (the key is), bounded; the HMAC is the same for every line of a client
        self._hash = lru_cache(maxsize=CLIENT_HASH_CACHE)(self._client_hash)
        if enabled and not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False  # a bare JSON line, not the root logger's prefix

    def client_hash(self, client_id: str | None) -> str | None:
        return None if client_id is None else self._hash(client_id)

    def _client_hash(self, client_id: str) -> str:
        return hmac.new(self._key, client_id.encode(), hashlib.sha256).hexdigest()[:16]

    def write(self, *, rid: str, transport: str, route: str, method: str, status: int | str,
              latency_s: float, notes: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        notes = notes or {}
        now = time.time()
        log.info(_LINE.encode({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
            "request_id": rid, "transport": transport, "route": route, "method": method,
            "status": status, "decision": notes.get("decision"),
            "latency_ms": round(latency_s * 1000, 3), "client": self.client_hash(notes.get("client")),
        }))


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request's start time, request id and access-log fields (``decision``,
    ``client``), from the moment Flask builds the request to the response."""

    t0: float
    rid: str
    notes: dict[str, Any] = field(default_factory=dict)


class ObservedRequest(Request):
    """Flask's request with its own ``access`` record, made when Flask builds the request
    (``app.request_class``, Flask's documented extension point), before routing and any
    hook: the record lives on the request it describes, and one ``after_request`` hook
    does the metrics, the log line and the headers (a ``before_request`` hook writing
    ``flask.g`` cost ~3 us more per request, benchmarks/bench_request_layer.py)."""

    def __init__(self, environ: dict[str, Any], populate_request: bool = True, shallow: bool = False) -> None:
        super().__init__(environ, populate_request, shallow)
        self.access = RequestRecord(time.perf_counter(), request_id(self.headers.get("X-Request-ID")))


def current_request() -> ObservedRequest:
    """The request object behind Flask's ``request`` proxy, for code that reads it many
    times: every attribute read through the proxy is a context lookup (~0.7 us, a dozen
    per predict request), so routes and hooks unwrap it once with
    ``_get_current_object()``, Flask's documented way to reach the proxied object.
    ``create_app`` makes every request an ``ObservedRequest``."""
    return cast(ObservedRequest, request._get_current_object())  # type: ignore[attr-defined]


def request_notes() -> dict[str, Any]:
    """This HTTP request's fields for its access-log line."""
    return current_request().access.notes


def timed_predict(st: "ApiState", dep: "Deployment", x: Any, client_id: str, notes: dict[str, Any],
                  transport: str) -> "Answer":
    """The shared guarded predict (``ApiState.predict``), timed into
    ``edgeward_inference_compute_seconds`` and noted for the access log."""
    notes["client"] = client_id
    t0 = time.perf_counter()
    try:
        ans = st.predict(dep, x, client_id)
    except ApiProblem as exc:
        notes["decision"] = decision_of(exc)
        raise
    finally:
        st.metrics.observe_compute(transport, time.perf_counter() - t0)
    notes["decision"] = ans.decision
    return ans
