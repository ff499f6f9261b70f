"""ApiConfig: deployment settings of one server (not the signed runtime policy).

The signed policy (input schema, rate limits, output policy, anomaly action)
travels inside the bundle; this object only says where the bundle and keys
are and how the HTTP layer behaves. It holds paths and names, never key
bytes, so it can be handed to worker processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Union

from .reload import RollbackTrigger

PathLike = Union[str, os.PathLike[str]]
RATE_LIMIT_HEADERS = ("refusals", "always")


@dataclass
class ApiConfig:
    bundle: str | None = None  # may be None when watch_dir will provide the first bundle
    public_key: Any = None  # PEM path, PEM bytes or Ed25519PublicKey
    kek_file: str | None = None
    kek_env: str | None = None
    kek: Any = None  # runtime_guard.bundle.Kek or 32 raw bytes (in-process use, tests)
    device_key_file: str | None = None  # X25519 key: per-bundle KEK from <bundle>.recipients.json
    passphrase_env: str | None = None  # name of the variable holding a KEK passphrase (scrypt)
    rollback_state: str | None = None
    storage_uri: str = "memory://"
    api_keys_file: str | None = None
    admin_token_file: str | None = None
    admin_token: str | None = None  # in-process use; prefer admin_token_file
    max_body_bytes: int = 8 * 1024 * 1024
    watch_dir: str | None = None
    watch_interval_s: float = 2.0
    watch_pattern: str = "*.ewb"
    rollback_trigger: RollbackTrigger = field(default_factory=RollbackTrigger)
    intra_op_threads: int = 1
    trust_forwarded_for: bool = False  # only behind a reverse proxy you control
    # RateLimit-* on 429s only ("refusals") or on every answer ("always"). Refusals by
    # default: a thief pacing a low-and-slow crawl should have to probe the budget, not
    # read it off every answer, and "always" costs one more storage read per request
    # (a network round trip with Redis).
    rate_limit_headers: str = "refusals"
    # Wall-clock budget for one candidate bundle (verify, admit, open, smoke runs): a
    # hostile graph is terminated / abandoned past it and the reload answers 409.
    load_deadline_s: float = 20.0
    # Fleet updates (docs/updates.md): a TUF repository URL, this device's id and a state
    # directory (TUF metadata, A/B slots, anti-rollback state: on by default with it).
    update_from: str | None = None
    state_dir: str | None = None
    device_id: str | None = None
    trusted_root: str | None = None  # the repository's root.json, provisioned out of band
    update_channel: str = "stable"
    update_interval_s: float = 60.0
    require_attestation: bool = True
    probation_rules: Any = None  # runtime_guard.update.triggers.ProbationRules; on with update_from
    # One JSON line per request on the edgeward.access logger (stderr); see api.access.
    access_log: bool = True

    def __post_init__(self) -> None:
        if self.bundle is None and self.watch_dir is None and self.update_from is None:
            raise ValueError("give a bundle path, a watch directory or an update source")
        if self.update_from is not None and (self.state_dir is None or not self.device_id):
            raise ValueError("an update source needs a state directory and a device id")
        if self.state_dir is not None:
            self.state_dir = os.fspath(self.state_dir)
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            if self.rollback_state is None:  # anti-rollback on by default with a state directory
                self.rollback_state = os.path.join(self.state_dir, "rollback.json")
        if self.public_key is None:
            raise ValueError("a pinned public key is required")
        if sum(x is not None for x in (self.kek_file, self.kek_env, self.kek, self.passphrase_env,
                                       self.device_key_file)) != 1:
            raise ValueError("give exactly one of kek_file, kek_env, passphrase_env, kek, device_key_file")
        if self.device_key_file is not None and not self.device_id:
            raise ValueError("a device key needs the device id it was sealed to")
        if self.rate_limit_headers not in RATE_LIMIT_HEADERS:
            raise ValueError(f"rate_limit_headers must be one of {RATE_LIMIT_HEADERS}")
        if not 0.1 <= float(self.load_deadline_s) <= 3600:
            raise ValueError("load_deadline_s must be between 0.1 and 3600 seconds")
        if not 1024 <= int(self.max_body_bytes) <= 1 << 30:
            raise ValueError("max_body_bytes must be between 1 KiB and 1 GiB")
        for name in ("bundle", "kek_file", "device_key_file", "rollback_state", "api_keys_file",
                     "admin_token_file", "watch_dir"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, os.fspath(v))
        if isinstance(self.public_key, os.PathLike):
            self.public_key = os.fspath(self.public_key)

    def load_kek(self) -> Any:
        from runtime_guard.bundle import load_kek
        from runtime_guard.bundle.keys import as_kek

        if self.kek is not None:
            return as_kek(self.kek)
        if self.passphrase_env is not None:
            from runtime_guard.errors import BundleKeyError

            value = os.environ.get(self.passphrase_env)
            if not value:
                raise BundleKeyError(f"environment variable {self.passphrase_env} is not set",
                                     check="kek-source")
            return load_kek(passphrase=value)
        return load_kek(file=self.kek_file) if self.kek_file else load_kek(env=self.kek_env)
