"""Device side of a fleet update: python-tuf's ngclient, then edgeward's own policy.

``FleetUpdater.check()`` refreshes the TUF metadata (root rotation, timestamp, snapshot,
targets: signatures against thresholds, versions never lower than the trusted ones,
expiry against the device clock, snapshot/targets consistency), reads the channel's
signed release list, picks the newest release whose rollout percentage covers this
device, downloads the bundle (length and hashes from the signed targets metadata) and
its attestation, and checks the attestation. Only then does it hand a local path to the
hot-swap path (``api.reload.ModelHolder.reload``), which runs every bundle check.

State (the TUF anti-rollback state among it) lives under ``state_dir``:
``tuf/metadata`` (trusted metadata, written by ngclient only after verification) and
``tuf/targets`` (downloaded, still encrypted bundles). The first run needs the
repository's root metadata, provisioned out of band (``trusted_root``); it is never
fetched on trust.

Needs the ``fleet`` extra (python-tuf).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import attestation
from .cohort import in_cohort
from .errors import UpdateError

CHANNEL_DIR = "channels"
MAX_CHANNEL_BYTES = 1 << 20


@dataclass(frozen=True)
class Offer:
    """A release for this device, downloaded and verified by TUF and its attestation."""

    path: str
    target: str
    version: int
    bundle_sha256: str
    percentage: float
    custom: dict[str, Any] = field(repr=False)
    statement: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "version": self.version, "bundle_sha256": self.bundle_sha256,
                "percentage": self.percentage, "attested": self.statement is not None}


def _tuf_error(exc: BaseException) -> UpdateError:
    from tuf.api import exceptions as te

    table: list[tuple[type[BaseException], str]] = [
        (te.ExpiredMetadataError, "tuf-expired"),
        (te.BadVersionNumberError, "tuf-version"),
        (te.UnsignedMetadataError, "tuf-signature"),
        (te.LengthOrHashMismatchError, "tuf-hash"),
        (te.DownloadError, "tuf-download"),
        (te.RepositoryError, "tuf-metadata"),
    ]
    for cls, check in table:
        if isinstance(exc, cls):
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            return UpdateError(f"{type(exc).__name__}: {msg}", check=check)
    if isinstance(exc, OSError):
        return UpdateError(f"update state: {exc.strerror or type(exc).__name__}", check="tuf-io")
    raise exc


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FleetUpdater:
    def __init__(self, url: str, state_dir: str | os.PathLike[str], public_key: Ed25519PublicKey,
                 device_id: str, *, channel: str = "stable",
                 trusted_root: str | os.PathLike[str] | None = None,
                 require_attestation: bool = True) -> None:
        import importlib.util

        if importlib.util.find_spec("tuf") is None:
            raise UpdateError("fleet updates need the 'fleet' extra (python-tuf): "
                              "pip install 'edgeward[fleet]'", check="fleet-extra")
        if not url.startswith(("http://", "https://")):
            raise UpdateError("update source must be an http(s):// URL", check="update-source")
        self.url = url.rstrip("/")
        self.state_dir = Path(state_dir)
        self.metadata_dir = self.state_dir / "tuf" / "metadata"
        self.targets_dir = self.state_dir / "tuf" / "targets"
        self.public_key = public_key
        self.device_id = device_id
        self.channel = channel
        self.trusted_root = None if trusted_root is None else Path(trusted_root)
        self.require_attestation = require_attestation
        self.metadata_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.targets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.metadata_dir / "root.json").exists() and self.trusted_root is None:
            raise UpdateError("first update needs the repository's trusted root metadata "
                              "(--trusted-root root.json, provisioned out of band)", check="update-root")

    def _updater(self) -> Any:
        from tuf.ngclient.updater import Updater

        bootstrap = None
        if not (self.metadata_dir / "root.json").exists():
            assert self.trusted_root is not None
            bootstrap = self.trusted_root.read_bytes()
        return Updater(metadata_dir=str(self.metadata_dir), metadata_base_url=f"{self.url}/metadata/",
                       target_dir=str(self.targets_dir), target_base_url=f"{self.url}/targets/",
                       bootstrap=bootstrap)

    def check(self, exclude: frozenset[str] | set[str] = frozenset()) -> Offer | None:
        """The release this device should run, or None (nothing published for its cohort).

        ``exclude``: bundle SHA-256s this device rolled back; they are skipped, so the
        device stays on (or returns to) the newest release it has not abandoned.
        Raises ``UpdateError`` naming the failed check."""
        try:
            return self._check(exclude)
        except UpdateError:
            raise
        except Exception as exc:
            raise _tuf_error(exc) from None

    def _fetch(self, updater: Any, target: str) -> tuple[Any, str]:
        info = updater.get_targetinfo(target)
        if info is None:
            raise UpdateError(f"target {target!r} is not in the signed targets metadata",
                              check="update-target")
        path = updater.find_cached_target(info) or updater.download_target(info)
        return info, str(path)

    def _check(self, exclude: frozenset[str] | set[str]) -> Offer | None:
        updater = self._updater()
        updater.refresh()
        _, channel_path = self._fetch(updater, f"{CHANNEL_DIR}/{self.channel}.json")
        try:
            with open(channel_path, "rb") as f:
                releases = json.loads(f.read(MAX_CHANNEL_BYTES))["releases"]
            if not isinstance(releases, list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise UpdateError("channel file is not a release list", check="update-channel") from None
        for rel in releases:  # newest first
            target = rel.get("target") if isinstance(rel, dict) else None
            if not isinstance(target, str):
                raise UpdateError("channel file is not a release list", check="update-channel")
            info = updater.get_targetinfo(target)
            if info is None:
                raise UpdateError(f"release {target!r} is not a signed target", check="update-target")
            meta = (info.custom or {}).get("edgeward")
            if not isinstance(meta, dict):
                raise UpdateError(f"target {target!r} has no edgeward custom metadata", check="update-target")
            pct = float((meta.get("rollout") or {}).get("percentage", 100))
            if not in_cohort(self.device_id, self.channel, pct):
                continue
            if meta.get("bundle_sha256") in exclude:
                continue
            _, path = self._fetch(updater, target)
            if isinstance(meta.get("recipients"), str):  # lands as <bundle path>.recipients.json
                _, rpath = self._fetch(updater, meta["recipients"])
                if rpath != path + ".recipients.json":
                    raise UpdateError("recipients target is not named after its bundle", check="update-target")
            digest = _sha256(path)
            statement = self._attestation(updater, meta, path, digest)
            return Offer(path, target, int(meta.get("version", -1)), digest, pct, meta, statement)
        return None

    def _attestation(self, updater: Any, meta: dict[str, Any], path: str,
                     digest: str) -> dict[str, Any] | None:
        from ..bundle import inspect_bundle

        att = meta.get("attestation")
        if att is None:
            if self.require_attestation:
                raise UpdateError("release carries no attestation", check="attestation-missing")
            return None
        _, att_path = self._fetch(updater, str(att))
        info = inspect_bundle(path, self.public_key)
        if info["signature_verified"] is not True:
            raise UpdateError("bundle is not signed by the pinned release key", check="signature")
        with open(att_path, "rb") as f:
            envelope = f.read(attestation.MAX_ENVELOPE + 1)
        return attestation.check(envelope, self.public_key, digest, info["manifest"].get("report_digest"))
