"""Hot update: load -> verify -> smoke test -> atomic swap -> probation.

``ModelHolder`` owns the deployment being served. A request takes one
reference (``holder.current()``) at its start and uses it to the end, so a
swap never changes the model under a running request: in-flight requests
finish on the bundle they started with and the old one is freed when the
last of them drops it.

A new bundle must (1) verify fully (signature, decryption, admission,
anti-rollback), (2) have a version above the one being served, (3) pass its
smoke test (golden inputs -> expected outputs from the signed manifest).
Only then is it swapped in, on probation: if the share of failed requests on
it crosses ``RollbackTrigger.max_error_rate`` (after ``min_requests``) within
``window_s`` seconds, the previous deployment is put back and the new digest
is remembered as bad. A deployment that survives probation is committed to
the anti-rollback state (``OpenedBundle.accept``), so the device never
commits to a version it had to abandon. Only failures the bundle causes count
there: a rate-limit storage outage is answered 503 without touching probation.

Every candidate (start-up, reload, watch directory) is loaded and smoke-run on
a helper thread under ``deadline_s`` (``runtime_guard.deadline``), and every
way it can fail leaves as ``BundleError`` or ``ReloadRefused`` (both
``runtime_guard.errors.LoadError``) with a check name, so the API answers 409 and ``serve`` exits 2 with one line.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_guard.errors import BundleError, GuardError, LoadError, ModelRejected

log = logging.getLogger("api.reload")


class ReloadRefused(LoadError):
    """A candidate bundle was not swapped in; ``check`` names why."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message, check=check)


@dataclass
class Deployment:
    """One loaded, verified bundle and the guarded model built from it."""

    model: Any  # runtime_guard.guard.GuardedModel
    version: int
    name: str
    manifest_sha256: str
    source: str
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)
    commit: Callable[[], None] | None = field(default=None, repr=False)
    loaded_at: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "manifest_sha256": self.manifest_sha256, "loaded_at": self.loaded_at}


@dataclass
class RollbackTrigger:
    """Error-rate rule for a freshly swapped deployment."""

    max_error_rate: float = 0.2
    min_requests: int = 20
    window_s: float = 60.0


@dataclass
class _Probation:
    deployment: Deployment
    previous: Deployment
    started: float
    total: int = 0
    errors: int = 0


@dataclass(frozen=True)
class ReloadResult:
    outcome: str  # "swapped" | "unchanged"
    version: int
    previous_version: int | None
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "version": self.version,
                "previous_version": self.previous_version, "manifest_sha256": self.manifest_sha256}


Loader = Callable[..., Deployment]  # (source, deadline) -> Deployment
SmokeTest = Callable[..., None]  # (deployment, deadline) -> None; raises to refuse
DEFAULT_DEADLINE_S = 20.0
_GRACE_S = 1.0  # past the deadline, how long to wait for a terminated run to unwind


def _refusal(exc: BaseException) -> BaseException:
    """The one shape a failed candidate leaves ``ModelHolder`` in: ``BundleError``
    (its own ``check``) or ``ReloadRefused``. Any other ``GuardError`` keeps its
    check (``config``, ``parts``, ``detectors``, ...); anything else a signed bundle
    can provoke in the loader (an onnxruntime failure, an OSError) becomes
    ``ReloadRefused`` with a check name, so callers answer 409 / exit 2 instead of
    a 500 or a traceback."""
    if isinstance(exc, (BundleError, ReloadRefused)):
        return exc
    if isinstance(exc, OSError):
        return ReloadRefused("io", f"bundle could not be read: {exc.strerror or type(exc).__name__}")
    msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return ReloadRefused(exc.check if isinstance(exc, GuardError) else "load", msg)


class ModelHolder:
    """Serves one deployment at a time; all transitions happen under a lock."""

    def __init__(self, loader: Loader, smoke_test: SmokeTest,
                 trigger: RollbackTrigger | None = None,
                 on_event: Callable[[str], None] | None = None,
                 deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self._loader = loader
        self._smoke = smoke_test
        self.deadline_s = float(deadline_s)
        self.trigger = trigger or RollbackTrigger()
        self._on_event = on_event or (lambda outcome: None)
        self._current: Deployment | None = None
        self._probation: _Probation | None = None
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one candidate at a time
        self.bad_digests: set[str] = set()
        self.last_event: dict[str, Any] | None = None

    # -- read side (hot path: one attribute read) ---------------------------
    def current(self) -> Deployment | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    def status(self) -> dict[str, Any]:
        self.tick()
        cur, prob = self._current, self._probation
        return {
            "ready": cur is not None,
            "current": cur.info() if cur else None,
            "probation": None if prob is None else {
                "previous_version": prob.previous.version, "requests": prob.total,
                "errors": prob.errors, "seconds": round(time.time() - prob.started, 3)},
            "last_event": self.last_event,
        }

    # -- transitions ---------------------------------------------------------
    def _event(self, outcome: str, quiet: bool = False, **info: Any) -> None:
        self.last_event = {"outcome": outcome, "at": time.time(), **info}
        if not quiet:  # quiet: the caller reports it (start-up failures are one stderr line)
            log.info("reload %s %s", outcome, info)
        try:
            self._on_event(outcome)
        except Exception:  # metrics must not break a reload
            log.exception("reload event hook failed")

    def load_initial(self, source: str) -> Deployment:
        """First bundle: verify + smoke test, serve, commit at once (nothing to roll back to).
        Raises ``BundleError`` or ``ReloadRefused``."""
        with self._reload_lock:
            try:
                dep = self._candidate(source, None)
            except Exception as exc:
                err = _refusal(exc)
                self._event("refused", quiet=True, check=getattr(err, "check", "load"))
                raise err from None
            assert dep is not None
            _commit(dep)
            with self._lock:
                self._current = dep
            self._event("initial", version=dep.version)
            return dep

    def reload(self, source: str) -> ReloadResult:
        """Verify, smoke test and swap in ``source``; raise ReloadRefused otherwise.

        BundleError subclasses from the loader propagate unchanged (callers map
        them to their check name); every other failure is a ReloadRefused. The
        whole candidate (load, admission, smoke runs) runs under ``deadline_s``:
        past it the reload is refused with check ``deadline`` and the lock is
        released even if a hostile graph is still unwinding."""
        with self._reload_lock:
            self.tick()
            unchanged: list[ReloadResult] = []

            def precheck(dep: Deployment) -> bool:
                cur = self._current
                if dep.manifest_sha256 in self.bad_digests:
                    raise ReloadRefused("known-bad", "this bundle was rolled back before")
                if cur is not None and dep.manifest_sha256 == cur.manifest_sha256:
                    unchanged.append(ReloadResult("unchanged", cur.version, cur.version,
                                                  cur.manifest_sha256))
                    return False
                if cur is not None and dep.version <= cur.version:
                    raise ReloadRefused(
                        "version", f"bundle version {dep.version} is not above the served "
                        f"version {cur.version}")
                return True

            try:
                dep = self._candidate(source, precheck)
            except Exception as exc:
                err = _refusal(exc)
                self._event("refused", check=getattr(err, "check", "load"))
                raise err from None
            if dep is None:
                return unchanged[0]
            with self._lock:
                prev = self._current
                self._current = dep
                if prev is None:
                    self._probation = None
                else:
                    self._probation = _Probation(dep, prev, time.time())
            if prev is None:
                _commit(dep)
            self._event("swapped", version=dep.version,
                        previous_version=None if prev is None else prev.version)
            return ReloadResult("swapped", dep.version, None if prev is None else prev.version,
                                dep.manifest_sha256)

    def _candidate(self, source: str,
                   precheck: Callable[[Deployment], bool] | None) -> Deployment | None:
        """Load + (precheck) + smoke test ``source`` on a helper thread under the deadline.

        ``None`` when ``precheck`` says there is nothing to do. The helper is a
        daemon thread: if a run cannot be terminated in time it is abandoned
        (its result discarded), so the caller and the reload lock move on."""
        from runtime_guard.deadline import Deadline

        deadline = Deadline(self.deadline_s)
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                dep = self._loader(source, deadline)
                if precheck is not None and not precheck(dep):
                    box["dep"] = None
                    return
                self._run_smoke(dep, deadline)
                box["dep"] = dep
            except BaseException as exc:  # handed to the waiting caller
                box["exc"] = exc

        t = threading.Thread(target=work, name="bundle-candidate", daemon=True)
        t.start()
        t.join(self.deadline_s + _GRACE_S)
        deadline.cancel()
        if t.is_alive():
            log.warning("candidate %s still running past the %.3g s deadline; abandoned",
                        os.path.basename(str(source)), self.deadline_s)
            raise ReloadRefused("deadline", f"loading the bundle did not finish within the "
                                f"{self.deadline_s:g} s deadline")
        if "exc" in box:
            raise box["exc"]
        dep: Deployment | None = box["dep"]
        return dep

    def _run_smoke(self, dep: Deployment, deadline: Any = None) -> None:
        try:
            self._smoke(dep, deadline)
        except (ReloadRefused, ModelRejected):  # incl. DeadlineExceeded: keeps its check
            raise
        except Exception as exc:  # any failure inside the smoke test refuses the bundle
            raise ReloadRefused("smoke-test", f"smoke test failed: {exc}") from None

    def record(self, dep: Deployment, ok: bool) -> None:
        """Outcome of one request served by ``dep`` (feeds the probation rule)."""
        prob = self._probation
        if prob is None or prob.deployment is not dep:
            return
        rollback = False
        with self._lock:
            if self._probation is not prob:
                return
            prob.total += 1
            prob.errors += 0 if ok else 1
            t = self.trigger
            if prob.total >= t.min_requests and prob.errors / prob.total > t.max_error_rate:
                self._current = prob.previous
                self._probation = None
                self.bad_digests.add(dep.manifest_sha256)
                rollback = True
        if rollback:
            self._event("rolled-back", version=dep.version, restored_version=prob.previous.version,
                        errors=prob.errors, requests=prob.total)
        else:
            self.tick()

    def tick(self) -> None:
        """End probation once its window has passed without a rollback."""
        prob = self._probation
        if prob is None or time.time() - prob.started < self.trigger.window_s:
            return
        with self._lock:
            if self._probation is not prob:
                return
            self._probation = None
        try:
            _commit(prob.deployment)
            self._event("committed", version=prob.deployment.version)
        except Exception as exc:  # state file trouble: keep serving, report it
            self._event("commit-failed", version=prob.deployment.version,
                        check=getattr(exc, "check", type(exc).__name__))


def _commit(dep: Deployment) -> None:
    if dep.commit is not None:
        dep.commit()


class DirectoryWatcher(threading.Thread):
    """Polls ``directory`` for bundle files and hands the newest new one to the holder.

    Polling (not inotify) keeps this dependency-free and works on every
    filesystem; a file is only tried once per (name, size, mtime), so a
    refused bundle is not retried in a loop.
    """

    def __init__(self, holder: ModelHolder, directory: str | os.PathLike[str], interval_s: float = 2.0,
                 pattern: str = "*.ewb") -> None:
        super().__init__(name="bundle-watch", daemon=True)
        self.holder = holder
        self.directory = Path(directory)
        self.interval_s = interval_s
        self.pattern = pattern
        self._stop = threading.Event()
        self._seen: set[tuple[str, int, int]] = set()

    def stop(self) -> None:
        self._stop.set()

    def scan_once(self) -> None:
        """One pass. Every entry is judged on its own: a FIFO, a device, an
        unreadable or vanishing file is logged once and skipped, never stops the
        scan (bundles are opened non-blocking and fstat-checked as well)."""
        self.holder.tick()
        try:
            names = list(self.directory.glob(self.pattern))
        except OSError as exc:
            self._note(("dir", exc.errno or 0, 0), "watch: cannot list %s: %s", self.directory,
                       exc.strerror)
            return
        entries = []
        for p in names:
            try:
                st = p.stat()
            except OSError as exc:
                self._note((p.name, -1, exc.errno or 0), "watch: skipping %s: %s", p.name, exc.strerror)
                continue
            if not stat.S_ISREG(st.st_mode):
                self._note((p.name, -2, st.st_mode), "watch: skipping %s: not a regular file", p.name)
                continue
            entries.append((st.st_mtime_ns, p, st))
        for _mtime, p, st in sorted(entries, key=lambda e: e[0]):
            key = (p.name, st.st_size, st.st_mtime_ns)
            if key in self._seen:
                continue
            self._seen.add(key)
            try:
                if self.holder.current() is None:
                    self.holder.load_initial(str(p))
                else:
                    self.holder.reload(str(p))
            except Exception as exc:
                log.warning("watch: %s not loaded: %s", p.name, getattr(exc, "check", type(exc).__name__))

    def _note(self, key: tuple[str, int, int], msg: str, *args: Any) -> None:
        if key not in self._seen:
            self._seen.add(key)
            log.warning(msg, *args)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:
                log.exception("bundle watch scan failed")
            self._stop.wait(self.interval_s)
