"""``serve --update-from URL``: poll a TUF repository and hot-swap what it offers this device.

Each pass: ``FleetUpdater.check`` (TUF metadata, cohort, download, attestation) -> the
holder's own checks and swap (``ModelHolder.reload``: signature, decryption, admission,
anti-rollback, smoke test) -> probation. The device keeps two slots in
``state_dir/slots.json``: A (serving) and B (the previous release, kept to fall back on).
A committed update moves A to B; a rollback leaves A in place and records the release's
bundle digest in ``state_dir/rolled-back.json``, so it is never installed again, not even
after a restart. On start-up slot A is served straight away (no network needed).

Any refusal keeps the running model serving; the outcome and its check name are in
``/v1/admin/status`` (``update``) and ``edgeward_update_checks{outcome}``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from runtime_guard.fileio import atomic_write

from .reload import ModelHolder, ReloadRefused

log = logging.getLogger("api.updates")


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError):
        log.warning("update state %s unreadable; treated as empty", path.name)
        return default


class UpdatePoller(threading.Thread):
    def __init__(self, holder: ModelHolder, updater: Any, state_dir: str, interval_s: float = 60.0,
                 on_check: Any = None) -> None:
        super().__init__(name="fleet-update", daemon=True)
        self.holder, self.updater, self.interval_s = holder, updater, interval_s
        self.state_dir = Path(state_dir)
        self._slots_path = self.state_dir / "slots.json"
        self._bad_path = self.state_dir / "rolled-back.json"
        self.slots: dict[str, Any] = _read_json(self._slots_path, {"A": None, "B": None})
        self.rolled_back: set[str] = set(_read_json(self._bad_path, []))
        self.refused: set[str] = set()  # refused by the bundle checks: not retried
        self._pending: dict[str, dict[str, Any]] = {}  # source path -> offer, while on probation
        self._on_check = on_check or (lambda outcome: None)
        self._stop = threading.Event()
        self._check_lock = threading.Lock()
        self.last_check: dict[str, Any] | None = None
        self.checks = 0
        holder.add_listener(self._on_transition)

    def stop(self) -> None:
        self._stop.set()

    # -- slots -------------------------------------------------------------
    def load_slot_a(self) -> bool:
        """Serve slot A at start-up, if there is one; False if not (or it no longer loads)."""
        a = self.slots.get("A")
        if not a or not Path(a["path"]).is_file():
            return False
        try:
            self.holder.load_initial(a["path"])
        except Exception as exc:
            log.warning("slot A (%s) not served: %s", a.get("target"), getattr(exc, "check", type(exc).__name__))
            return False
        return True

    def _save(self) -> None:
        atomic_write(self._slots_path, json.dumps(self.slots, sort_keys=True).encode())
        atomic_write(self._bad_path, json.dumps(sorted(self.rolled_back)).encode())

    def _on_transition(self, outcome: str, event: dict[str, Any]) -> None:
        offer = self._pending.get(str(event.get("source")))
        if offer is None:
            return
        if outcome == "committed":
            if (self.slots.get("A") or {}).get("bundle_sha256") != offer["bundle_sha256"]:
                self.slots = {"A": offer, "B": self.slots.get("A")}
            self._pending.pop(offer["path"], None)
        elif outcome == "rolled-back":
            self.rolled_back.add(offer["bundle_sha256"])
            self._pending.pop(offer["path"], None)
        else:
            return
        self._save()

    # -- polling -----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"source": self.updater.url, "device_id": self.updater.device_id,
                "channel": self.updater.channel, "checks": self.checks, "last_check": self.last_check,
                "slots": self.slots, "rolled_back": sorted(self.rolled_back)}

    def _record(self, outcome: str, **info: Any) -> dict[str, Any]:
        self.checks += 1
        self.last_check = {"outcome": outcome, "at": time.time(), **info}
        if outcome not in ("current", "none"):
            log.info("update %s %s", outcome, info)
        try:
            self._on_check(outcome)
        except Exception:
            log.exception("update metrics hook failed")
        return self.last_check

    def check_once(self) -> dict[str, Any]:
        """One update pass; returns what happened (also kept as ``last_check``)."""
        from runtime_guard.errors import BundleError

        with self._check_lock:
            self.holder.tick()
            try:
                offer = self.updater.check(exclude=self.rolled_back | self.refused)
            except BundleError as exc:
                return self._record("refused", check=exc.check, detail=str(exc)[:300])
            if offer is None:
                return self._record("none", detail="no release for this device's cohort")
            info = {**offer.to_dict(), "path": offer.path}
            cur = self.holder.current()
            if cur is not None and cur.source == offer.path:
                return self._record("current", **offer.to_dict())
            self._pending[offer.path] = info
            try:
                if cur is None:
                    self.holder.load_initial(offer.path)
                    self.slots = {"A": info, "B": self.slots.get("A")}
                    self._pending.pop(offer.path, None)
                    self._save()
                    return self._record("installed", **offer.to_dict())
                res = self.holder.reload(offer.path)
            except (BundleError, ReloadRefused) as exc:
                self._pending.pop(offer.path, None)
                self.refused.add(offer.bundle_sha256)
                return self._record("refused", check=getattr(exc, "check", "load"), detail=str(exc)[:300],
                                    **offer.to_dict())
            if res.outcome == "unchanged":
                self._pending.pop(offer.path, None)
                return self._record("current", **offer.to_dict())
            return self._record("installed", **offer.to_dict(), previous_version=res.previous_version)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:
                log.exception("update check failed")
            self._stop.wait(self.interval_s)
