"""The release side of fleet updates: a TUF repository built with python-tuf's Metadata API.

Layout (plain files: any static HTTP server can serve ``repo_dir``)::

    repo_dir/metadata/N.root.json, root.json     root (N = version; root.json = newest)
    repo_dir/metadata/N.targets.json, N.snapshot.json, timestamp.json
    repo_dir/targets/bundles/vV/<sha256>.<bundle>.ewb    (consistent snapshots)
    repo_dir/targets/bundles/vV/<sha256>.<bundle>.ewb.intoto.json
    repo_dir/targets/channels/<sha256>.<channel>.json    newest-first release list
    keys_dir/<keyid>.pem      role keys, PKCS#8 encrypted with the repository passphrase, 0600
    keys_dir/revoked/         keys rotated out (kept for the audit trail, still encrypted)

Each bundle target carries, in its ``custom`` metadata, the bundle version, the audit
report digest, the attestation target and the rollout percentage; all of it is signed
by the targets role. Keys never reach the served directory, and never sit on disk
unencrypted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from hardening.errors import InputError

ROLES = ("root", "targets", "snapshot", "timestamp")
DEFAULT_EXPIRY_S = {"root": 365 * 86400, "targets": 90 * 86400, "snapshot": 7 * 86400, "timestamp": 86400}
CHANNEL_DIR = "channels"


def _expires(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _percentage(value: float) -> int:
    """Whole percent: TUF's canonical JSON (what signatures cover) has no floats."""
    if not 0 <= value <= 100 or value != int(value):
        raise InputError("rollout percentage must be a whole number within 0..100")
    return int(value)


@dataclass(frozen=True)
class Release:
    target: str
    version: int
    bundle_sha256: str
    percentage: int
    attestation: str | None
    report_digest: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "version": self.version, "bundle_sha256": self.bundle_sha256,
                "percentage": self.percentage, "attestation": self.attestation,
                "report_digest": self.report_digest}


class Repository:
    """One TUF repository on disk and its encrypted role keys."""

    def __init__(self, repo_dir: str | Path, keys_dir: str | Path, passphrase: bytes) -> None:
        if not passphrase:
            raise InputError("the repository key passphrase is empty")
        self.repo_dir, self.keys_dir = Path(repo_dir), Path(keys_dir)
        self.metadata_dir, self.targets_dir = self.repo_dir / "metadata", self.repo_dir / "targets"
        self._passphrase = passphrase
        if self.keys_dir.resolve().is_relative_to(self.repo_dir.resolve()):
            raise InputError("keep the keys directory outside the served repository directory")

    # -- keys ------------------------------------------------------------------
    def _new_signer(self) -> Any:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from securesystemslib.signer import CryptoSigner, SSlibKey

        from runtime_guard.bundle import write_secret_file

        priv = Ed25519PrivateKey.generate()
        pub = SSlibKey.from_crypto(priv.public_key())
        pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.BestAvailableEncryption(self._passphrase))
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_secret_file(self.keys_dir / f"{pub.keyid}.pem", pem)
        return CryptoSigner(priv, pub)

    def load_signer(self, keyid: str, revoked: bool = False) -> Any:
        from cryptography.hazmat.primitives import serialization
        from securesystemslib.signer import CryptoSigner, SSlibKey

        from runtime_guard.bundle.keys import read_secret_file
        from runtime_guard.errors import BundleKeyError

        path = (self.keys_dir / "revoked" if revoked else self.keys_dir) / f"{keyid}.pem"
        try:
            priv = serialization.load_pem_private_key(read_secret_file(path), password=self._passphrase)
        except BundleKeyError as exc:
            raise InputError(f"{path}: {exc}") from None
        except (ValueError, TypeError):
            raise InputError(f"{path}: cannot decrypt the key (wrong passphrase?)") from None
        return CryptoSigner(priv, SSlibKey.from_crypto(priv.public_key()))  # type: ignore[arg-type]

    def signers(self, role: str, root: Any | None = None) -> list[Any]:
        root = root or self.load("root")
        return [self.load_signer(k) for k in root.signed.roles[role].keyids]

    # -- metadata --------------------------------------------------------------
    def _write(self, md: Any, name: str) -> None:
        from tuf.api.serialization.json import JSONSerializer

        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        ser = JSONSerializer(compact=False)
        if name == "timestamp":
            md.to_file(str(self.metadata_dir / "timestamp.json"), serializer=ser)
            return
        md.to_file(str(self.metadata_dir / f"{md.signed.version}.{name}.json"), serializer=ser)
        if name == "root":
            md.to_file(str(self.metadata_dir / "root.json"), serializer=ser)

    def load(self, role: str) -> Any:
        from tuf.api.metadata import Metadata

        if not (self.metadata_dir / "timestamp.json").is_file():
            raise InputError(f"{self.repo_dir}: not a repository (run `edgeward repo init` first)")
        if role == "root":
            return Metadata.from_file(str(self.metadata_dir / "root.json"))
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        if role == "snapshot":
            ts = self.load("timestamp")
            return Metadata.from_file(str(self.metadata_dir / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
        snap = self.load("snapshot")
        return Metadata.from_file(str(self.metadata_dir / f"{snap.signed.meta['targets.json'].version}.targets.json"))

    @classmethod
    def init(cls, repo_dir: str | Path, keys_dir: str | Path, passphrase: bytes, *,
             thresholds: dict[str, int] | None = None,
             expiry_s: dict[str, float] | None = None) -> "Repository":
        from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

        repo = cls(repo_dir, keys_dir, passphrase)
        if repo.metadata_dir.exists() and any(repo.metadata_dir.iterdir()):
            raise InputError(f"{repo.metadata_dir}: already holds metadata; refusing to overwrite")
        thresholds = {r: 1 for r in ROLES} | (thresholds or {})
        exp = DEFAULT_EXPIRY_S | (expiry_s or {})
        for r, t in thresholds.items():
            if r not in ROLES or not 1 <= t <= 8:
                raise InputError(f"threshold {r}={t}: roles are {', '.join(ROLES)}, thresholds 1..8")
        root = Metadata(Root(expires=_expires(exp["root"]), consistent_snapshot=True))
        signers: dict[str, list[Any]] = {}
        for role in ROLES:
            signers[role] = [repo._new_signer() for _ in range(thresholds[role])]
            for s in signers[role]:
                root.signed.add_key(s.public_key, role)
            root.signed.roles[role].threshold = thresholds[role]
        mds = {"root": root, "targets": Metadata(Targets(expires=_expires(exp["targets"]))),
               "snapshot": Metadata(Snapshot(expires=_expires(exp["snapshot"]))),
               "timestamp": Metadata(Timestamp(expires=_expires(exp["timestamp"])))}
        for role in ROLES:
            for s in signers[role]:
                mds[role].sign(s, append=True)
            repo._write(mds[role], role)
        return repo

    def _commit(self, targets: Any, *, expiry_s: dict[str, float] | None = None,
                root: Any | None = None) -> None:
        """Sign ``targets`` as a new version, then a new snapshot and timestamp over it."""
        from tuf.api.metadata import MetaFile

        exp = DEFAULT_EXPIRY_S | (expiry_s or {})
        root = root or self.load("root")
        snap, ts = self.load("snapshot"), self.load("timestamp")
        targets.signed.version += 1
        targets.signed.expires = _expires(exp["targets"])
        self._sign(targets, "targets", root)
        snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snap.signed.version += 1
        snap.signed.expires = _expires(exp["snapshot"])
        self._sign(snap, "snapshot", root)
        ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        ts.signed.version += 1
        ts.signed.expires = _expires(exp["timestamp"])
        self._sign(ts, "timestamp", root)
        for md, name in ((targets, "targets"), (snap, "snapshot"), (ts, "timestamp")):
            self._write(md, name)

    def _sign(self, md: Any, role: str, root: Any) -> None:
        md.signatures.clear()
        for s in self.signers(role, root):
            md.sign(s, append=True)

    # -- targets ---------------------------------------------------------------
    def _add_file(self, targets: Any, target_path: str, local: Path, custom: dict[str, Any] | None) -> str:
        from tuf.api.metadata import TargetFile

        tf = TargetFile.from_file(target_path, str(local), ["sha256"])
        if custom is not None:
            tf.unrecognized_fields["custom"] = custom
        digest = tf.hashes["sha256"]
        rel = Path(target_path)
        dest = self.targets_dir / rel.parent / f"{digest}.{rel.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dest)
        targets.signed.targets[target_path] = tf
        return str(digest)

    def releases(self, channel: str = "stable") -> list[dict[str, Any]]:
        targets = self.load("targets")
        tf = targets.signed.targets.get(f"{CHANNEL_DIR}/{channel}.json")
        if tf is None:
            return []
        path = self.targets_dir / CHANNEL_DIR / f"{tf.hashes['sha256']}.{channel}.json"
        out: list[dict[str, Any]] = json.loads(path.read_text())["releases"]
        return out

    def publish(self, bundle: str | Path, *, percentage: float = 100, channel: str = "stable",
                attestation: str | Path | None = None, public_key: Any = None,
                expiry_s: dict[str, float] | None = None) -> Release:
        """Add ``bundle`` (and its attestation, by default ``<bundle>.intoto.json`` when present)
        as targets and put it first in ``channel``."""
        from runtime_guard.bundle import inspect_bundle
        from runtime_guard.errors import BundleError
        from runtime_guard.update import attestation as att

        bundle = Path(bundle)
        if attestation is None and bundle.with_name(bundle.name + ".intoto.json").is_file():
            attestation = bundle.with_name(bundle.name + ".intoto.json")
        percentage = _percentage(percentage)
        if not channel.replace("-", "").replace("_", "").isalnum():
            raise InputError("channel names are letters, digits, '-' and '_'")
        try:
            info = inspect_bundle(bundle, public_key)
        except BundleError as exc:
            raise InputError(f"{bundle}: {exc.check}: {exc}") from None
        except OSError as exc:
            raise InputError(f"{bundle}: {exc.strerror}") from None
        if info["signature_verified"] is False:
            raise InputError(f"{bundle}: not signed by the given release key")
        manifest = info["manifest"]
        version, digest = int(manifest["version"]), _sha256(bundle)
        if attestation is not None:
            env = Path(attestation).read_bytes()
            if public_key is not None:
                from runtime_guard.bundle.keys import coerce_public_key
                from runtime_guard.update.errors import UpdateError

                try:  # the device would refuse it: refuse now
                    att.check(env, coerce_public_key(public_key), digest, manifest.get("report_digest"))
                except UpdateError as exc:
                    raise InputError(f"{attestation}: {exc.check}: {exc}") from None
        targets = self.load("targets")
        base = f"bundles/v{version}/{bundle.name}"
        att_target = None
        if attestation is not None:
            att_target = base + ".intoto.json"
            self._add_file(targets, att_target, Path(attestation), None)
        custom = {"edgeward": {"version": version, "bundle_sha256": digest,
                               "manifest_sha256": info["manifest_sha256"],
                               "report_digest": manifest.get("report_digest"),
                               "forced": bool(manifest.get("forced")), "attestation": att_target,
                               "rollout": {"percentage": percentage, "channel": channel}}}
        recipients = bundle.with_name(bundle.name + ".recipients.json")
        if recipients.is_file():  # per-device key wrapping: fetched beside the bundle
            self._add_file(targets, base + ".recipients.json", recipients, None)
            custom["edgeward"]["recipients"] = base + ".recipients.json"
        self._add_file(targets, base, bundle, custom)
        releases = [r for r in self.releases(channel) if r["target"] != base]
        releases.insert(0, {"target": base, "version": version})
        channel_file = self.repo_dir.parent / f".{self.repo_dir.name}-{channel}.json.tmp"
        channel_file.write_text(json.dumps({"channel": channel, "releases": releases}, indent=1))
        try:
            self._add_file(targets, f"{CHANNEL_DIR}/{channel}.json", channel_file, None)
        finally:
            channel_file.unlink()
        self._commit(targets, expiry_s=expiry_s)
        return Release(base, version, digest, percentage, att_target, manifest.get("report_digest"))

    def set_percentage(self, target: str, percentage: float, expiry_s: dict[str, float] | None = None) -> None:
        """Widen (or pull back) a staged release: only its signed custom metadata changes."""
        targets = self.load("targets")
        tf = targets.signed.targets.get(target)
        if tf is None or "edgeward" not in (tf.custom or {}):
            raise InputError(f"{target}: not a published bundle")
        tf.unrecognized_fields["custom"]["edgeward"]["rollout"]["percentage"] = _percentage(percentage)
        self._commit(targets, expiry_s=expiry_s)

    def refresh_timestamp(self, expires_in_s: float | None = None) -> int:
        """New timestamp version over the same snapshot (run it before the old one expires)."""
        root, ts = self.load("root"), self.load("timestamp")
        ts.signed.version += 1
        ts.signed.expires = _expires(DEFAULT_EXPIRY_S["timestamp"] if expires_in_s is None else expires_in_s)
        self._sign(ts, "timestamp", root)
        self._write(ts, "timestamp")
        return int(ts.signed.version)

    def rotate(self, role: str, expiry_s: dict[str, float] | None = None) -> list[str]:
        """Replace every key of ``role`` (e.g. after a compromise) with new ones.

        New root version listing the new keys, signed by the current root keys (and, for
        the root role, the new ones too, as clients verify N+1 with N's and N+1's keys);
        then the role's metadata is re-signed as a new version with the new keys. Devices
        that update learn the new root and refuse anything the old keys sign from then on.
        Old key files move to ``revoked/``. Returns the new key ids."""
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}")
        root = self.load("root")
        old_root_signers = self.signers("root", root)
        old = list(root.signed.roles[role].keyids)
        new = [self._new_signer() for _ in old]
        for k in old:
            root.signed.revoke_key(k, role)
        for s in new:
            root.signed.add_key(s.public_key, role)
        root.signed.version += 1
        root.signed.expires = _expires((DEFAULT_EXPIRY_S | (expiry_s or {}))["root"])
        root.signatures.clear()
        signers = old_root_signers + (new if role == "root" else [])
        for s in signers:
            root.sign(s, append=True)
        self._write(root, "root")
        (self.keys_dir / "revoked").mkdir(exist_ok=True, mode=0o700)
        for k in old:
            if k not in root.signed.keys:
                (self.keys_dir / f"{k}.pem").rename(self.keys_dir / "revoked" / f"{k}.pem")
        if role in ("targets", "snapshot", "timestamp"):
            self._commit(self.load("targets"), expiry_s=expiry_s, root=root)
        return [s.public_key.keyid for s in new]
