"""The request layer after the #17 regression work: a declared Content-Length is read as
exactly that many bytes (a shorter body is a 400, never a hang or a partial parse; bytes
past it are ignored, as WSGI says), chunked bodies keep Werkzeug's bounded stream; request
ids are 32 hex digits; the access log's client hash is keyed and cached per client."""

from __future__ import annotations

import io
import re
import sys

import pytest

from api_fixtures import api_env, bundle_v1, json_body  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def app(api_env, bundle_v1):
    from api import create_app

    return create_app(api_env.app_config(bundle_v1))


def _call(app, body: bytes, content_length: int | None, **extra):
    """The app as a WSGI callable with a hand-made environ (what waitress passes)."""
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/predict", "SCRIPT_NAME": "", "QUERY_STRING": "",
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
           "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
           "CONTENT_TYPE": "application/json", "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:8080",
           **extra}
    if content_length is not None:
        env["CONTENT_LENGTH"] = str(content_length)
    got: dict = {}

    def start_response(status, headers, exc_info=None):
        got["status"], got["headers"] = int(status[:3]), dict(headers)

    got["body"] = b"".join(app(env, start_response))
    return got


def test_declared_length_is_read_exactly(app, api_env):
    import json

    body = json_body(api_env.x[:1]).encode()
    ok = _call(app, body, len(body))
    assert ok["status"] == 200
    labels = json.loads(ok["body"])["labels"]
    # bytes past the declared length are not part of the body (the next request's, on keep-alive)
    assert _call(app, body + b"garbage", len(body))["status"] == 200
    short = _call(app, body, len(body) + 10)  # the client promised more than it sent
    assert short["status"] == 400 and short["headers"]["Content-Type"] == "application/problem+json"
    assert _call(app, body[:-3], len(body) - 3)["status"] == 400  # truncated JSON: invalid body
    chunked = _call(app, body, None, **{"wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    assert chunked["status"] == 200 and json.loads(chunked["body"])["labels"] == labels


def test_declared_length_past_the_cap_is_413_before_reading(app):
    limit = app.config["MAX_CONTENT_LENGTH"]

    class Untouchable(io.RawIOBase):
        def read(self, *a):  # noqa: ARG002
            raise AssertionError("the body must not be read")

    got = _call(app, b"", limit + 1, **{"wsgi.input": Untouchable()})
    assert got["status"] == 413


def test_generated_request_ids_are_fresh_hex(app):
    c = app.test_client()
    ids = {c.get("/healthz").headers["X-Request-ID"] for _ in range(50)}
    assert len(ids) == 50 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert c.get("/healthz", headers={"X-Request-ID": "mine-1"}).headers["X-Request-ID"] == "mine-1"


def test_client_hash_is_keyed_stable_and_bounded():
    import hashlib
    import hmac

    from api.access import CLIENT_HASH_CACHE, AccessLog

    a, b = AccessLog(False), AccessLog(False)
    assert a.client_hash(None) is None
    h = a.client_hash("key:client0")
    assert h == a.client_hash("key:client0") == hmac.new(a._key, b"key:client0", hashlib.sha256).hexdigest()[:16]
    assert b.client_hash("key:client0") != h  # random key per log (per process)
    for i in range(CLIENT_HASH_CACHE + 100):
        a.client_hash(f"addr:{i}")
    assert a._hash.cache_info().currsize == CLIENT_HASH_CACHE


def test_every_request_carries_its_own_access_record(app):
    """The record is made with the request (no before_request hook), so even requests that
    never reach a view (404, 405) get an id, a latency and their log line fields."""
    from api.access import ObservedRequest, current_request

    assert app.request_class is ObservedRequest
    with app.test_request_context("/v1/predict", method="POST", headers={"X-Request-ID": "rec-1"}):
        req = current_request()
        assert isinstance(req, ObservedRequest) and req.access.rid == "rec-1" and req.access.notes == {}
        assert req.access.t0 > 0
    c = app.test_client()
    for r in (c.get("/no/such/path"), c.delete("/v1/predict", headers={"X-Request-ID": "rec-2"})):
        assert r.status_code in (404, 405) and re.fullmatch(r"[0-9a-f]{32}|rec-2", r.headers["X-Request-ID"])
    text = c.get("/metrics").get_data(as_text=True)
    assert 'edgeward_request_latency_seconds_count{endpoint="unmatched"}' in text
