"""Schemathesis against the live server's ``/openapi.json``: no 5xx, and every
response matches the documented status codes, content types, headers and schemas."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from api_fixtures import ADMIN_TOKEN, api_env, bundle_v1  # noqa: E402,F401
from servers import ServerProcess  # noqa: E402

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
    st_checks.ignored_auth,
]


@pytest.fixture(scope="module")
def live(api_env, bundle_v1, tmp_path_factory):
    from api.auth import add_key

    d = tmp_path_factory.mktemp("schemathesis")
    key = add_key(d / "keys.json", "fuzzer")
    args = api_env.serve_args(bundle_v1, "--api-keys", str(d / "keys.json"),
                              "--admin-token-file", str(api_env.admin_token_path),
                              "--max-body-bytes", "262144")
    srv = ServerProcess(args, d / "server.log").start()
    yield srv, key
    srv.stop()
    assert "Traceback" not in srv.log(), srv.log()  # no unhandled error behind any response


def _schema():
    from api.openapi import openapi_document

    return schemathesis.openapi.from_dict(openapi_document(api_keys=True, admin=True))


SCHEMA = _schema()


def _cases():
    """(operation, mode) pairs; negative data only where there is input to break."""
    out = []
    for r in SCHEMA.get_all_operations():
        op = r.ok()
        raw = SCHEMA.raw_schema["paths"][op.path][op.method.lower()]
        out.append(pytest.param(op, schemathesis.GenerationMode.POSITIVE, id=f"{op.label}-positive"))
        if "requestBody" in raw:  # free-form string path params have no invalid values
            out.append(pytest.param(op, schemathesis.GenerationMode.NEGATIVE, id=f"{op.label}-negative"))
    return out


def test_served_document_is_the_tested_one(live):
    import requests

    srv, _ = live
    assert requests.get(srv.url + "/openapi.json").json() == SCHEMA.raw_schema


@pytest.mark.parametrize("operation,mode", _cases())
def test_openapi_conformance(operation, mode, live):
    srv, key = live
    token = ADMIN_TOKEN if operation.path.startswith("/v1/admin") else key

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def run(case):
        case.call_and_validate(base_url=srv.url, headers={"Authorization": f"Bearer {token}"},
                               checks=CHECKS, timeout=30)

    run()
