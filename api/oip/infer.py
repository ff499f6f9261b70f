"""One OIP inference, whatever the transport: resolve the model (and version),
run the shared guarded predict, build the requested output tensors.

The outputs a client may ask for are ``label`` (INT64 ``[N]``) and
``scores`` (FP32 ``[N, C]``, already shaped by the signed output policy:
one-hot under ``label_only``, top-k only under ``top_k``, ...). Raw logits
are never an output; naming anything else is a 400, before the request
spends rate budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..access import timed_predict
from ..body import bad_body
from ..problems import ApiProblem
from ..reload import Deployment
from ..state import ApiState
from .stats import InferenceStats

OUTPUT_DATATYPES = {"label": "INT64", "scores": "FP32"}
MAX_ID = 256


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    x: np.ndarray  # float32, the guard's schema
    outputs: tuple[OutputRequest, ...]
    request_id: str = ""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    array: np.ndarray
    binary: bool


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    request_id: str
    outputs: tuple[OutputTensor, ...]
    decision: str
    reasons: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]


def oip_problem(exc: ApiProblem) -> ApiProblem:
    """Every OIP error body carries ``error`` (what OIP clients decode)."""
    exc.extra.setdefault("error", exc.detail or exc.title)
    return exc


def resolve(st: ApiState, name: str, version: str | None = None) -> Deployment:
    """The served deployment if ``name`` (and ``version``, when given) match it."""
    dep = st.holder.current()
    if dep is None:
        raise oip_problem(ApiProblem(503, "not-ready", "Service Unavailable", "no model is loaded yet",
                                     headers={"Retry-After": "5"}))
    if name != dep.name:
        raise oip_problem(ApiProblem(404, "unknown-model", "Not Found", f"no model named {name[:64]!r}"))
    if version not in (None, "") and version != str(dep.version):
        raise oip_problem(ApiProblem(404, "unknown-model-version", "Not Found",
                                     f"model {name!r} has no version {version[:32]!r}; "
                                     f"version {dep.version} is served"))
    return dep


def requested_outputs(names_binary: list[tuple[object, bool]], default_binary: bool) -> tuple[OutputRequest, ...]:
    """The outputs asked for (all, in the model's order, when none are named)."""
    if not names_binary:
        return tuple(OutputRequest(n, default_binary) for n in OUTPUT_DATATYPES)
    out: list[OutputRequest] = []
    for name, binary in names_binary:
        if not isinstance(name, str) or name not in OUTPUT_DATATYPES:
            shown = name[:64] if isinstance(name, str) else name
            raise bad_body(f"unknown output {shown!r}; the outputs are {sorted(OUTPUT_DATATYPES)}",
                           "oip-output")
        if any(o.name == name for o in out):
            raise bad_body(f"output {name!r} is requested twice", "oip-output")
        out.append(OutputRequest(name, binary))
    return tuple(out)


def check_request_id(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bad_body("id must be a string", "oip")
    return value[:MAX_ID]


def run(st: ApiState, stats: InferenceStats, dep: Deployment, req: InferRequest,
        client_id: str, notes: dict[str, Any], transport: str) -> InferResponse:
    """Guarded predict through the shared service layer (auth is the caller's job:
    ``client_id`` is already authenticated); ``notes`` collects the access-log fields."""
    t0 = time.perf_counter_ns()
    try:
        ans = timed_predict(st, dep, req.x, client_id, notes, transport)
    except ApiProblem as exc:
        stats.record(dep.name, str(dep.version), False, time.perf_counter_ns() - t0, 0)
        raise oip_problem(exc) from None
    except Exception:
        stats.record(dep.name, str(dep.version), False, time.perf_counter_ns() - t0, 0)
        raise
    n = len(ans.labels)
    values: dict[str, Any] = {"label": np.asarray(ans.labels, dtype=np.int64)}
    if ans.scores is not None:
        values["scores"] = np.asarray(ans.scores, dtype=np.float32).reshape(n, -1)
    missing = [o.name for o in req.outputs if o.name not in values]
    if missing:  # never a silent stand-in for what the policy did not produce
        raise oip_problem(ApiProblem(400, "output-unavailable", "Output unavailable",
                                     f"this answer carries no {missing[0]!r} output",
                                     extra={"check": "oip-output"}))
    outputs = tuple(OutputTensor(o.name, OUTPUT_DATATYPES[o.name], values[o.name], o.binary)
                    for o in req.outputs)
    stats.record(dep.name, str(dep.version), True, time.perf_counter_ns() - t0, n)
    return InferResponse(dep.name, str(dep.version), req.request_id, outputs, ans.decision,
                         tuple(ans.reasons), tuple(ans.headers))
