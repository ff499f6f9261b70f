"""``POST /v1/predict`` and ``GET /v1/model``."""

from __future__ import annotations

import json

from flask import Blueprint, Response, jsonify

from ..access import current_request, timed_predict
from ..body import parse_predict_body
from ..service import describe
from ..state import state

bp = Blueprint("predict", __name__, url_prefix="/v1")


@bp.post("/predict")
def predict() -> Response:
    st, req = state(), current_request()
    client_id = st.client_id(req)
    dep = st.require_model()  # this request stays on this deployment to the end
    x = parse_predict_body(req, st.config.max_body_bytes)
    ans = timed_predict(st, dep, x, client_id, req.access.notes, "http")
    body = json.dumps({"model": {"name": dep.name, "version": dep.version}, "decision": ans.decision,
                       "reasons": ans.reasons, "labels": ans.labels, "scores": ans.scores})
    return Response(body, 200, headers=ans.headers, content_type="application/json")


@bp.get("/model")
def model() -> Response:
    return jsonify(describe(state().require_model()))
