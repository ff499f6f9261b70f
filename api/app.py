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

from flask import Flask, Response

from .access import AccessLog, ObservedRequest, current_request
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
    app.request_class = ObservedRequest  # each request carries its start time, id and log notes
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
    _observe_requests(app, metrics, access_log)

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


SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"))


def _observe_requests(app: Flask, metrics: ApiMetrics, access_log: AccessLog) -> None:
    """Per-request metrics, the access-log line, the request id and the security headers
    on every response (Flask runs ``after_request`` for error responses too). Latency
    runs from Flask building the request (``ObservedRequest``) to the response being ready."""
    observe = metrics.observe_request

    @app.after_request
    def finish(response: Response) -> Response:
        req = current_request()
        record = req.access
        latency = time.perf_counter() - record.t0
        rule = req.url_rule
        route, method, code = ("unmatched" if rule is None else rule.rule), req.method, response.status_code
        observe(route, method, code, latency)
        access_log.write(rid=record.rid, transport="http", route=route, method=method[:16], status=code,
                         latency_s=latency, notes=record.notes)
        headers = response.headers
        for name, value in SECURITY_HEADERS:
            headers.add(name, value)
        headers["X-Request-ID"] = record.rid
        return response
