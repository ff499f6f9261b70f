"""Per-app state shared by the blueprints (``current_app.extensions["edgeward"]``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Request, current_app

from runtime_guard.ratelimit import StorageUnavailable

from .auth import AdminToken, KeyStore, presented_token
from .config import ApiConfig
from .metrics import ApiMetrics
from .problems import ApiProblem
from .reload import Deployment, DirectoryWatcher, ModelHolder
from .service import Answer, run_predict

EXT = "edgeward"


def storage_problem(exc: StorageUnavailable) -> ApiProblem:
    """503 for a rate-limit storage outage (fail closed), naming the cause."""
    wait = max(1, int(exc.retry_after))
    return ApiProblem(503, "rate-limit-storage-unavailable", "Service Unavailable",
                      f"the rate-limit storage is unreachable ({exc.cause}); retry in {wait}s",
                      extra={"check": "rate-limit-storage", "cause": exc.cause},
                      headers={"Retry-After": str(wait)})


@dataclass
class ApiState:
    config: ApiConfig
    holder: ModelHolder
    metrics: ApiMetrics
    keys: KeyStore | None
    admin: AdminToken | None
    watcher: DirectoryWatcher | None = None
    poller: Any = None  # api.updates.UpdatePoller with --update-from

    draining: bool = False

    def readiness(self) -> Deployment:
        """The deployment if this process should get traffic; else a 503 naming why
        (draining for shutdown, no model, rate-limit storage down)."""
        if self.draining:
            raise ApiProblem(503, "draining", "Service Unavailable", "the server is shutting down",
                             extra={"check": "draining"}, headers={"Retry-After": "1"})
        dep = self.require_model()
        health = dep.model.limiter.health
        if not health.ok and not health.probe():
            raise ApiProblem(503, "rate-limit-storage-unavailable", "Service Unavailable",
                             f"the rate-limit storage is unreachable ({health.cause})",
                             extra={"check": "rate-limit-storage", "cause": health.cause},
                             headers={"Retry-After": "1"})
        return dep

    def require_model(self) -> Deployment:
        dep = self.holder.current()
        if dep is None:
            raise ApiProblem(503, "not-ready", "Service Unavailable", "no model is loaded yet",
                             headers={"Retry-After": "5"})
        return dep

    def predict(self, dep: Deployment, x: Any, client_id: str) -> Answer:
        """Guarded predict that also feeds metrics and the hot-update probation
        (refusals count as healthy; only server-side failures are errors)."""
        try:
            ans = run_predict(dep, x, client_id, self.config.rate_limit_headers == "always")
        except StorageUnavailable as exc:
            # Not the bundle's fault: never fed to probation (a Redis outage must not roll
            # back a good hot update), answered 503 rather than served unlimited.
            self.metrics.observe_decision("unavailable", ["rate_limit:storage"])
            raise storage_problem(exc) from None
        except ApiProblem as exc:  # a refusal: run_predict raises nothing else of this type
            self.holder.record(dep, exc.status < 500)
            if exc.verdict is not None:
                self.metrics.observe_verdict(exc.verdict)
            raise
        except Exception:
            self.holder.record(dep, False)
            self.metrics.observe_decision("error", ["exception"])
            raise
        self.holder.record(dep, True)
        self.metrics.observe_verdict(ans.verdict)
        return ans

    def client_id(self, req: Request) -> str:
        """Key id when API keys are on (401 otherwise), else the remote address."""
        if self.keys is not None:
            key_id = self.keys.identify(presented_token(req))
            if key_id is None:
                raise ApiProblem(401, "unauthorized", "Unauthorized",
                                 "a valid API key is required (Authorization: Bearer <key>)",
                                 headers={"WWW-Authenticate": 'Bearer realm="edgeward"'})
            return "key:" + key_id
        addr = req.remote_addr or "unknown"
        if self.config.trust_forwarded_for and req.access_route:
            addr = req.access_route[0]
        return "addr:" + addr

    def require_admin(self, req: Request) -> None:
        if self.admin is None:
            raise ApiProblem(403, "admin-disabled", "Forbidden",
                             "admin endpoints are disabled (no admin token configured)")
        token = presented_token(req)
        if token is None:
            raise ApiProblem(401, "unauthorized", "Unauthorized", "admin token required",
                             headers={"WWW-Authenticate": 'Bearer realm="edgeward-admin"'})
        if not self.admin.check(token):
            raise ApiProblem(403, "forbidden", "Forbidden", "this token may not use admin endpoints")


def state() -> ApiState:
    st: ApiState = current_app.extensions[EXT]
    return st
