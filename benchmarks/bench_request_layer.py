"""Server-side CPU of the Flask request layer per ``/v1/predict``, any checkout, no HTTP.

The guarded app of the tree on ``PYTHONPATH`` (its own ``create_app``, its own bundle built by
its own ``benchmarks/bench_api.build_assets``: API keys, moving-window limit, output policy
"full", telemetry, metrics, request id, JSON access log to /dev/null) and a bare Flask +
onnxruntime app (defined here, so it is the same for every tree) are called as WSGI
callables in this process, alternated round by round; CPU per request is
``time.thread_time`` (this thread only, so other processes on a shared machine count less).
``guarded_minus_bare`` is the guard plus the request layer. Run it from each tree, alternating:

    cd TREE && OMP_NUM_THREADS=1 PYTHONPATH=. /path/to/.venv/bin/python \\
        /path/to/benchmarks/bench_request_layer.py --demo-dir /tmp/gate/cache/digits [--json]

``--hooks`` instead times the observer designs on a trivial route in one process: none, a
WSGI middleware, before+after_request hooks with ``flask.g``, and a ``request_class`` with
one after_request hook, each doing the same work (start time, request id, three headers).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench_api import environ  # this script's folder: the same request for every tree


def bare_app(model_path: str) -> Any:
    import numpy as np
    import onnxruntime as ort
    from flask import Flask, jsonify, request

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    app = Flask("bare")

    @app.post("/v1/predict")
    def predict() -> Any:
        x = np.asarray(request.get_json()["inputs"], dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        logits = sess.run([out], {inp: x})[0]
        z = logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return jsonify(labels=logits.argmax(axis=1).tolist(), scores=(z / z.sum(axis=1, keepdims=True)).tolist())

    return app


def _ok(status: str, headers: list[Any], exc_info: object = None) -> None:
    if not status.startswith("200"):
        raise RuntimeError(f"in-process request failed: {status}")


def cpu_per_request(apps: dict[str, Callable[..., Any]], bodies: dict[str, Callable[[int], dict[str, Any]]],
                    n: int, rounds: int) -> dict[str, list[float]]:
    """us of this thread's CPU per request, one figure per round, apps alternated every round."""
    out: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            make = bodies[name]
            for i in range(n // 10 + n):  # the first tenth warms up
                if i == n // 10:
                    t0 = time.thread_time()
                b"".join(app(make(i), _ok))
            out[name].append(1e6 * (time.thread_time() - t0) / n)
    return out


def predict_layer(demo_dir: Path, n: int, rounds: int) -> dict[str, Any]:
    sys.path.insert(0, os.getcwd())  # the tree under test (cwd), for its bench_api.build_assets
    from api import create_app
    from api.auth import add_key
    from api.config import ApiConfig
    from benchmarks.bench_api import build_assets

    work = Path(tempfile.mkdtemp(prefix="bench_request_layer_"))
    model, bundles, body = build_assets(demo_dir, work, "1000000/minute")
    keys = [add_key(work / "keys.json", f"client{i}") for i in range(8)]
    guarded = create_app(ApiConfig(bundle=str(bundles["guarded"]), public_key=str(work / "pub.pem"),
                                   kek_file=str(work / "kek.key"), api_keys_file=str(work / "keys.json")))
    for handler in logging.getLogger("edgeward.access").handlers:  # written, as served, not shown
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    res = cpu_per_request({"bare": bare_app(str(model)), "guarded": guarded},
                          {"bare": lambda i: environ(body, None), "guarded": lambda i: environ(body, keys[i % 8])},
                          n, rounds)
    diff = [g - b for g, b in zip(res["guarded"], res["bare"])]
    return {"tree": os.getcwd(), "bare_us": statistics.median(res["bare"]),
            "guarded_us": statistics.median(res["guarded"]), "guarded_minus_bare_us": statistics.median(diff),
            "rounds_guarded_us": [round(v, 1) for v in res["guarded"]],
            "rounds_bare_us": [round(v, 1) for v in res["bare"]], "load_average": os.getloadavg()[0]}


def observer_designs(n: int, rounds: int) -> dict[str, Any]:
    from flask import Flask, Request, Response, g, request

    def make(kind: str) -> Any:
        app = Flask(kind)

        @app.post("/p")
        def p() -> Response:
            return Response(b'{"ok":1}', 200, content_type="application/json")

        def headers(resp: Response, rid: str) -> Response:
            resp.headers.add("Cache-Control", "no-store")
            resp.headers.add("X-Content-Type-Options", "nosniff")
            resp.headers["X-Request-ID"] = rid
            return resp

        if kind == "before+after_request hooks, flask.g":
            @app.before_request
            def start() -> None:
                g.access = (time.perf_counter(), request.headers.get("X-Request-ID") or secrets.token_hex(16))

            @app.after_request
            def finish(resp: Response) -> Response:
                req = request._get_current_object()  # type: ignore[attr-defined]
                _route = (req.url_rule, req.method)  # what the real hook reads for its metrics
                return headers(resp, g.access[1])
        elif kind == "request_class + after_request hook":
            class Observed(Request):
                def __init__(self, environ: dict[str, Any], populate_request: bool = True, shallow: bool = False) -> None:
                    super().__init__(environ, populate_request, shallow)
                    self.access = (time.perf_counter(), self.headers.get("X-Request-ID") or secrets.token_hex(16))

            app.request_class = Observed

            @app.after_request
            def finish(resp: Response) -> Response:
                req = request._get_current_object()  # type: ignore[attr-defined]
                _route = (req.url_rule, req.method)
                return headers(resp, req.access[1])
        elif kind == "WSGI middleware":
            inner = app.wsgi_app

            def mw(env: dict[str, Any], start_response: Any) -> Any:
                _t0, rid = time.perf_counter(), env.get("HTTP_X_REQUEST_ID") or secrets.token_hex(16)

                def start(status: str, hdrs: list[Any], exc_info: Any = None) -> Any:
                    hdrs += [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("X-Request-ID", rid)]
                    return start_response(status, hdrs, exc_info)

                return inner(env, start)

            app.wsgi_app = mw  # type: ignore[method-assign]
        return app

    kinds = ["none", "WSGI middleware", "before+after_request hooks, flask.g", "request_class + after_request hook"]
    apps = {k: make(k) for k in kinds}
    res = cpu_per_request(apps, {k: (lambda i: environ(b"", None, "/p")) for k in kinds}, n, rounds)
    base = statistics.median(res["none"])
    return {k: {"us": statistics.median(v), "over_none_us": statistics.median(v) - base} for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=Path("/tmp/gate/cache/digits"))
    ap.add_argument("-n", type=int, default=2000, help="requests per app per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hooks", action="store_true", help="compare observer designs on a trivial route")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = observer_designs(a.n, a.rounds) if a.hooks else predict_layer(a.demo_dir, a.n, a.rounds)
    print(json.dumps(res, indent=None if a.json else 2))


if __name__ == "__main__":
    main()
