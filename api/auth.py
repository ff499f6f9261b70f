"""API keys and the admin token.

Keys are 256-bit random strings, so a plain SHA-256 is enough to store them
(no password stretching needed: nothing to brute-force). The keys file holds
only ``{id, sha256}`` pairs; the plaintext key is shown once, when created.
Lookups hash the presented key and compare against *every* stored digest with
``hmac.compare_digest`` so timing does not reveal which prefix matched.

The admin token is separate: a client API key never opens admin endpoints.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from flask import Request

from runtime_guard.fileio import atomic_write, read_regular_file

PathLike = Union[str, os.PathLike[str]]
KEY_PREFIX = "ew_"
KEYS_FORMAT = 1
KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_TOKEN_LEN = 512
MAX_KEYS_FILE = 16 * 1024 * 1024


class AuthConfigError(ValueError):
    """The keys file or admin token file is missing, malformed or unsafe."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    sha256: str
    created_at: int


class KeyStore:
    """In-memory set of hashed API keys, loaded from a JSON keys file."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self.entries = list(entries)

    @classmethod
    def load(cls, path: PathLike) -> "KeyStore":
        try:
            obj = json.loads(read_regular_file(path, MAX_KEYS_FILE)[0].decode("utf-8"))
        except FileNotFoundError:
            raise AuthConfigError(f"keys file not found: {path}") from None
        except OSError as exc:
            raise AuthConfigError(f"cannot read keys file {path}: {exc.strerror}") from None
        except (ValueError, UnicodeDecodeError):
            raise AuthConfigError(f"keys file is not valid JSON: {path}") from None
        if not isinstance(obj, dict) or obj.get("format") != KEYS_FORMAT or not isinstance(obj.get("keys"), list):
            raise AuthConfigError("keys file must be {\"format\": 1, \"keys\": [...]}")
        entries = []
        seen: set[str] = set()
        for e in obj["keys"]:
            if (not isinstance(e, dict) or not isinstance(e.get("id"), str)
                    or not KEY_ID_RE.match(e["id"]) or e["id"] in seen
                    or not isinstance(e.get("sha256"), str)
                    or not re.fullmatch(r"[0-9a-f]{64}", e["sha256"])):
                raise AuthConfigError("keys file entries need a unique id and a sha256 hex digest")
            seen.add(e["id"])
            entries.append(KeyEntry(e["id"], e["sha256"], int(e.get("created_at", 0))))
        return cls(entries)

    def identify(self, presented: str | None) -> str | None:
        """Key id for a presented key, or None. Compares against all entries."""
        if not presented or len(presented) > MAX_TOKEN_LEN:
            return None
        d = _digest(presented)
        found: str | None = None
        for e in self.entries:
            if hmac.compare_digest(d, e.sha256) and found is None:
                found = e.key_id
        return found


def add_key(path: PathLike, key_id: str) -> str:
    """Create a new key with ``key_id`` in the keys file (created if absent,
    mode 0600) and return the plaintext key -- the only time it exists."""
    if not KEY_ID_RE.match(key_id):
        raise AuthConfigError("key id must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    p = Path(path)
    store = KeyStore.load(p) if p.exists() else KeyStore([])
    if any(e.key_id == key_id for e in store.entries):
        raise AuthConfigError(f"key id {key_id!r} already exists")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entries = store.entries + [KeyEntry(key_id, _digest(key), int(time.time()))]
    _write_keys(p, entries)
    return key


def remove_key(path: PathLike, key_id: str) -> None:
    p = Path(path)
    store = KeyStore.load(p)
    kept = [e for e in store.entries if e.key_id != key_id]
    if len(kept) == len(store.entries):
        raise AuthConfigError(f"no key with id {key_id!r}")
    _write_keys(p, kept)


def _write_keys(path: Path, entries: list[KeyEntry]) -> None:
    data = json.dumps({"format": KEYS_FORMAT, "keys": [
        {"id": e.key_id, "sha256": e.sha256, "created_at": e.created_at} for e in entries]},
        indent=2).encode("utf-8")
    atomic_write(path, data, mode=0o600)


class AdminToken:
    """The admin token, held only as its SHA-256 digest."""

    def __init__(self, token: str) -> None:
        token = token.strip()
        if len(token) < 16:
            raise AuthConfigError("admin token must be at least 16 characters")
        self._digest = _digest(token)

    @classmethod
    def from_file(cls, path: PathLike) -> "AdminToken":
        try:
            raw, st = read_regular_file(path, 4096)
            text = raw.decode("utf-8")
        except OSError as exc:
            raise AuthConfigError(f"cannot read admin token file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise AuthConfigError("admin token file is not UTF-8") from None
        if st.st_mode & 0o077:
            raise AuthConfigError("admin token file permissions are wider than 0600")
        return cls(text)

    def check(self, presented: str | None) -> bool:
        if not presented or len(presented) > MAX_TOKEN_LEN:
            return False
        return hmac.compare_digest(_digest(presented), self._digest)


def generate_admin_token() -> str:
    return secrets.token_urlsafe(32)


def presented_token(req: Request) -> str | None:
    """``Authorization: Bearer <token>`` or ``X-API-Key: <token>``."""
    auth = req.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return req.headers.get("X-API-Key") or None
