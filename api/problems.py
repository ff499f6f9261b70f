"""RFC 9457 problem details: one JSON error shape for every failure.

Every error the API returns -- our own (sanitizer, auth, rate limit) and
Werkzeug's (404, 405, 413, ...) -- goes through ``problem_response`` so
clients parse one format. The catch-all handler logs the traceback server
side and returns a generic 500 body: no exception text, paths or stack
frames ever reach the client.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, has_request_context, json, request
from werkzeug.exceptions import HTTPException

if TYPE_CHECKING:
    from runtime_guard.verdict import Verdict

PROBLEM_MIME = "application/problem+json"
TYPE_BASE = "https://edgeward.dev/problems/"
log = logging.getLogger("api.errors")


class ApiProblem(Exception):
    """Raise anywhere in a view to answer with a problem document.

    ``slug`` becomes the ``type`` URI; ``extra`` adds extension members
    (e.g. ``check`` for sanitizer rejections); ``headers`` are added to the
    response (e.g. ``Retry-After``); ``verdict`` is the guard's verdict when the
    guard refused the request (``api.decisions``).
    """

    def __init__(self, status: int, slug: str, title: str, detail: str | None = None, *,
                 extra: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None,
                 verdict: Verdict | None = None) -> None:
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        self.verdict = verdict


def problem_response(status: int, slug: str, title: str, detail: str | None = None, *,
                     extra: Mapping[str, Any] | None = None,
                     headers: Mapping[str, str] | None = None) -> Response:
    body: dict[str, Any] = {"type": TYPE_BASE + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra or {})
    if has_request_context() and request.path.startswith("/v2"):
        body.setdefault("error", detail or title)  # the member OIP clients decode
    resp = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIME)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _slug(title: str) -> str:
    return title.lower().replace(" ", "-").replace("'", "")


def _http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    title = exc.name or "Error"
    headers: dict[str, str] = {}
    if status == 405 and getattr(exc, "valid_methods", None):
        headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    detail = {
        404: "no such endpoint",
        405: "method not allowed on this endpoint",
        413: "request body is larger than the configured limit",
        415: "unsupported content type",
    }.get(status, exc.description if status < 500 else None)
    if status >= 500:  # never echo server-side details
        detail = None
    return problem_response(status, _slug(title), title, detail, headers=headers)


def _api_problem(exc: ApiProblem) -> Response:
    return problem_response(exc.status, exc.slug, exc.title, exc.detail,
                            extra=exc.extra, headers=exc.headers)


def _unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):  # pragma: no cover - routed above by Flask
        return _http_exception(exc)
    log.exception("unhandled error while serving a request")
    return problem_response(500, "internal", "Internal Server Error",
                            "the server failed to handle this request; see server logs")


def register_error_handlers(app: Flask) -> None:
    """JSON problem bodies for ApiProblem, every HTTP error and anything else."""
    app.register_error_handler(ApiProblem, _api_problem)
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(Exception, _unexpected)
