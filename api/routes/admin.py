"""Admin endpoints (separate admin token): hot update and status."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from runtime_guard.errors import LoadError

from ..body import bad_body, media_type, parse_json_document, read_body, unsupported_type
from ..problems import ApiProblem
from ..state import state

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")
MAX_ADMIN_BODY = 64 * 1024


@bp.post("/reload")
def reload() -> Response:
    """Load a bundle from a server-side path (default: the configured one) and
    swap it in if it verifies and passes its smoke test."""
    st = state()
    st.require_admin(request)
    path = st.config.bundle
    if request.content_length or media_type(request):
        if media_type(request) != "application/json":
            raise unsupported_type(media_type(request))
        doc = parse_json_document(read_body(request, MAX_ADMIN_BODY))
        if not isinstance(doc, dict) or not isinstance(doc.get("path", path), str):
            raise bad_body("body must be {\"path\": \"<bundle path on the server>\"}", "json")
        path = doc.get("path", path)
    if not path:
        raise bad_body("no bundle path given and none configured", "json")
    try:
        result = st.holder.reload(path)
    except LoadError as exc:  # ModelHolder leaves every failure as BundleError or ReloadRefused
        raise ApiProblem(409, "reload-refused", "Reload refused", str(exc),
                         extra={"check": exc.check}) from None
    return jsonify(result.to_dict())


@bp.get("/status")
def status() -> Response:
    st = state()
    st.require_admin(request)
    return jsonify(st.holder.status())
