"""Liveness, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import os

from flask import Blueprint, Response, jsonify, request

from ..openapi import openapi_document
from ..state import state

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Process is up (does not need a model)."""
    return jsonify(status="ok", pid=os.getpid())


@bp.get("/readyz")
def readyz() -> Response:
    """Ready = a verified, smoke-tested bundle is being served, its rate-limit storage
    answers and the process is not draining for shutdown."""
    dep = state().readiness()
    return jsonify(status="ready", model={"name": dep.name, "version": dep.version})


@bp.get("/metrics")
def metrics() -> Response:
    body, ctype = state().metrics.render(request.headers.get("Accept", ""))
    return Response(body, mimetype=None, content_type=ctype)


@bp.get("/openapi.json")
def openapi() -> Response:
    st = state()
    return jsonify(openapi_document(api_keys=st.keys is not None, admin=st.admin is not None))
