"""Application factory: ``create_app(config) -> Flask``.

Everything per-app (model holder, metrics registry, keys) lives in
``app.extensions["edgeward"]`` so several apps can coexist in one process.
The first bundle is verified and smoke-tested here, before the server binds:
a bad bundle stops start-up instead of serving 503s. With only a watch
directory the app starts not-ready and ``/readyz`` answers 503 until a good
bundle appears.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, request

from .auth import AdminToken, KeyStore
from .config import ApiConfig
from .metrics import ApiMetrics
from .problems import register_error_handlers
from .reload import DirectoryWatcher, ModelHolder
from .service import make_loader, smoke_test
from .state import EXT, ApiState


def create_app(config: ApiConfig | Mapping[str, Any]) -> Flask:
    cfg = config if isinstance(config, ApiConfig) else ApiConfig(**dict(config))
    app = Flask("edgeward-api")
    app.config.update(MAX_CONTENT_LENGTH=cfg.max_body_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False

    metrics_holder: dict[str, ModelHolder] = {}

    def snapshot() -> dict[str, Any] | None:
        dep = metrics_holder["h"].current()
        return None if dep is None else dep.model.telemetry.snapshot()

    metrics = ApiMetrics(snapshot)
    def on_event(outcome: str) -> None:
        metrics.reloads.labels(outcome).inc()
        dep = holder.current()
        if dep is not None:
            metrics.model_version.set(dep.version)

    holder = ModelHolder(make_loader(cfg), smoke_test, cfg.rollback_trigger, on_event=on_event)
    metrics_holder["h"] = holder
    keys = KeyStore.load(cfg.api_keys_file) if cfg.api_keys_file else None
    admin = (AdminToken.from_file(cfg.admin_token_file) if cfg.admin_token_file
             else AdminToken(cfg.admin_token) if cfg.admin_token else None)
    st = ApiState(cfg, holder, metrics, keys, admin)
    app.extensions[EXT] = st

    if cfg.bundle is not None:
        holder.load_initial(cfg.bundle)

    from .routes import admin as admin_routes
    from .routes import health, predict, v2

    app.register_blueprint(health.bp)
    app.register_blueprint(predict.bp)
    app.register_blueprint(admin_routes.bp)
    app.register_blueprint(v2.bp)
    register_error_handlers(app)
    _install_request_metrics(app, st)

    if cfg.watch_dir is not None:
        st.watcher = DirectoryWatcher(holder, cfg.watch_dir, cfg.watch_interval_s, cfg.watch_pattern)
        st.watcher.start()
    return app


SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


def _install_request_metrics(app: Flask, st: ApiState) -> None:
    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _done(resp: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        t0 = g.get("t0")
        st.metrics.observe_request(rule, request.method, resp.status_code,
                                   0.0 if t0 is None else time.perf_counter() - t0)
        resp.headers.extend(SECURITY_HEADERS)
        return resp
