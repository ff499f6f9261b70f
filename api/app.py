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

from flask import Flask

from .access import ENV_ID, ENV_NOTES, AccessLog, request_id
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

    judge = None
    if cfg.update_from is not None or cfg.probation_rules is not None:
        from .probation import TelemetryJudge

        judge = TelemetryJudge(cfg.probation_rules)
    holder = ModelHolder(make_loader(cfg), smoke_test, cfg.rollback_trigger, on_event=on_event,
                         deadline_s=cfg.load_deadline_s, judge=judge)

    def on_rollback(outcome: str, event: dict[str, Any]) -> None:
        if outcome == "rolled-back":
            metrics.rollbacks.labels(str(event.get("trigger", "error_rate"))).inc()

    holder.add_listener(on_rollback)
    metrics_holder["h"] = holder
    keys = KeyStore.load(cfg.api_keys_file) if cfg.api_keys_file else None
    admin = (AdminToken.from_file(cfg.admin_token_file) if cfg.admin_token_file
             else AdminToken(cfg.admin_token) if cfg.admin_token else None)
    st = ApiState(cfg, holder, metrics, keys, admin)
    app.extensions[EXT] = st

    poller = None
    if cfg.update_from is not None:
        poller = st.poller = _update_poller(cfg, holder, metrics)
    if cfg.bundle is not None:
        holder.load_initial(cfg.bundle)
    elif poller is not None:
        poller.load_slot_a()

    from .routes import admin as admin_routes
    from .routes import health, predict, v2

    app.register_blueprint(health.bp)
    app.register_blueprint(predict.bp)
    app.register_blueprint(admin_routes.bp)
    app.register_blueprint(v2.bp)
    from .oip.stats import InferenceStats

    app.extensions[v2.STATS_EXT] = InferenceStats()
    register_error_handlers(app)
    metrics.allow_endpoints({rule.rule for rule in app.url_map.iter_rules()})
    app.extensions[ACCESS_EXT] = access_log = AccessLog(cfg.access_log)
    app.wsgi_app = RequestObserver(app.wsgi_app, metrics, access_log)  # type: ignore[method-assign]

    if cfg.watch_dir is not None:
        st.watcher = DirectoryWatcher(holder, cfg.watch_dir, cfg.watch_interval_s, cfg.watch_pattern)
        st.watcher.start()
    if poller is not None:
        poller.start()
    return app


ACCESS_EXT = "edgeward.access"


def _update_poller(cfg: ApiConfig, holder: ModelHolder, metrics: ApiMetrics) -> Any:
    from runtime_guard.bundle import load_public_key
    from runtime_guard.bundle.keys import coerce_public_key
    from runtime_guard.update.client import FleetUpdater

    from .updates import UpdatePoller

    assert cfg.update_from is not None and cfg.state_dir is not None and cfg.device_id
    public_key = load_public_key(cfg.public_key) if isinstance(cfg.public_key, str) else coerce_public_key(cfg.public_key)
    updater = FleetUpdater(cfg.update_from, cfg.state_dir, public_key, cfg.device_id,
                           channel=cfg.update_channel, trusted_root=cfg.trusted_root,
                           require_attestation=cfg.require_attestation)
    return UpdatePoller(holder, updater, cfg.state_dir, cfg.update_interval_s,
                        on_check=lambda outcome: metrics.update_checks.labels(outcome).inc())


SECURITY_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]


class RequestObserver:
    """WSGI middleware: per-request metrics and the security headers on every response.

    Done at the WSGI layer rather than with ``before_request``/``after_request``:
    Flask hooks cost a context lookup, a ``g`` write and a header-object rebuild
    per request, which is measurable on a ~0.5 ms request. Latency is measured
    up to ``start_response`` (when the status is known), as the hooks did.
    """

    def __init__(self, wsgi_app: Any, metrics: ApiMetrics, access_log: AccessLog) -> None:
        self.wsgi_app = wsgi_app
        self.observe = metrics.observe_request
        self.access_log = access_log

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        t0 = time.perf_counter()
        rid = environ[ENV_ID] = request_id(environ.get("HTTP_X_REQUEST_ID"))

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            req = environ.get("werkzeug.request")  # set by Flask's request object
            rule = req.url_rule if req is not None else None
            route, method, code = ("unmatched" if rule is None else rule.rule,
                                   environ.get("REQUEST_METHOD", "?"), int(status[:3]))
            latency = time.perf_counter() - t0
            self.observe(route, method, code, latency)
            self.access_log.write(rid=rid, transport="http", route=route, method=method[:16], status=code,
                                  latency_s=latency, notes=environ.get(ENV_NOTES))
            headers += SECURITY_HEADERS
            headers.append(("X-Request-ID", rid))
            return start_response(status, headers, exc_info)

        return self.wsgi_app(environ, start)
