"""Anti-rollback state: the highest bundle version this device has accepted.

Kept in a small JSON file replaced atomically (temp file in the same
directory, fsync, os.replace, fsync the directory) so a crash leaves either
the old or the new state, never a torn one. A state file that exists but
cannot be parsed fails closed (RollbackError) instead of resetting to 0.

This defends against an attacker who can replace the bundle file but not the
state file; whoever can rewrite the state can roll back (see docs).
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import RollbackError
from ..fileio import atomic_write, read_regular_file

STATE_FORMAT = 1


@dataclass(frozen=True)
class RollbackRecord:
    version: int
    manifest_sha256: str
    accepted_at: int


class RollbackState:
    """File-backed monotonic version counter for one deployment slot."""

    def __init__(self, path: Union[str, os.PathLike[str]]) -> None:
        self.path = Path(path)

    def load(self) -> RollbackRecord | None:
        """Current record, or None before the first accepted bundle."""
        try:
            raw, _ = read_regular_file(self.path, 1 << 20)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RollbackError(f"cannot read rollback state: {exc.strerror}", check="state-io") from None
        try:
            obj = json.loads(raw)
            if obj.get("format") != STATE_FORMAT:
                raise ValueError
            v, d, t = obj["version"], obj["manifest_sha256"], obj["accepted_at"]
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    and isinstance(d, str) and isinstance(t, int)):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RollbackError("rollback state file is corrupt", check="state-corrupt") from None
        return RollbackRecord(v, d, t)

    @property
    def highest_version(self) -> int | None:
        rec = self.load()
        return None if rec is None else rec.version

    def check(self, version: int, manifest_sha256: str) -> None:
        """Refuse versions below the accepted one, and a *different* bundle
        re-using the accepted version number (same-version re-signing would
        otherwise let an old artefact replace the current one)."""
        rec = self.load()
        if rec is None:
            return
        if version < rec.version:
            raise RollbackError(
                f"bundle version {version} is older than accepted version {rec.version}",
                check="rollback")
        if version == rec.version and not hmac.compare_digest(manifest_sha256, rec.manifest_sha256):
            raise RollbackError(
                f"a different bundle with version {version} was already accepted",
                check="rollback-same-version")

    def accept(self, version: int, manifest_sha256: str, now: int | None = None) -> None:
        """Record ``version`` as accepted (never lowers the counter).

        Check and write happen under an exclusive lock on ``<state>.lock`` so
        two processes accepting concurrently cannot lower the counter.
        """
        lock_fd = os.open(self.path.with_name(self.path.name + ".lock"),
                          os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            self.check(version, manifest_sha256)
            rec = {"format": STATE_FORMAT, "version": version, "manifest_sha256": manifest_sha256,
                   "accepted_at": int(time.time() if now is None else now)}
            atomic_write(self.path, json.dumps(rec, sort_keys=True).encode("utf-8"))
        finally:
            os.close(lock_fd)  # releases the lock
