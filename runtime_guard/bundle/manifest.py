"""Canonical JSON manifest: build, encode, parse and validate.

The manifest is the signed statement of what the publisher approved. Canonical
encoding (sorted keys, no whitespace, UTF-8, no NaN) makes the signed bytes a
pure function of the content, and the strict parser refuses anything that is
not exactly that encoding (duplicate keys, NaN, other spellings).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypeGuard

from ..errors import FormatError
from .format import FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

FORMAT_NAME = "edgeward.bundle"
AEAD_NAME = "AES-256-GCM"
KDF_NAME = "HKDF-SHA256"
MAX_PAYLOADS = 64
MAX_JSON_INT = 2**53 - 1  # portable JSON integer range
PAYLOAD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

# Keys the writer owns; callers may not set them through manifest_fields.
RESERVED_KEYS = frozenset(
    {"format", "format_version", "version", "created_at", "expires_at", "payloads", "crypto"}
)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8, no NaN/Infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def manifest_digest(manifest_bytes: bytes) -> bytes:
    return hashlib.sha256(manifest_bytes).digest()


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError("non-finite number")


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Strictly decode and validate manifest bytes. Raises FormatError."""
    try:
        obj = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_dupes, parse_constant=_no_constants
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError("manifest is not valid UTF-8 JSON", check="manifest-json") from None
    if not isinstance(obj, dict):
        raise FormatError("manifest is not a JSON object", check="manifest-json")
    if canonical_json(obj) != raw:
        raise FormatError("manifest is not canonically encoded", check="manifest-canonical")
    validate_manifest(obj)
    return obj


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(msg: str) -> FormatError:
    return FormatError(f"manifest: {msg}", check="manifest-fields")


def validate_manifest(m: dict[str, Any]) -> None:
    """Type/range checks on the fields the loader relies on."""
    if m.get("format") != FORMAT_NAME or m.get("format_version") != FORMAT_VERSION:
        raise _fail("unknown format or format_version")
    for key in ("version", "created_at"):
        if not _is_int(m.get(key)) or not 0 <= m[key] <= MAX_JSON_INT:
            raise _fail(f"{key} must be a non-negative integer")
    exp = m.get("expires_at")
    if exp is not None and (not _is_int(exp) or not 0 <= exp <= MAX_JSON_INT):
        raise _fail("expires_at must be an integer or null")
    if not isinstance(m.get("forced"), bool):
        raise _fail("forced must be a boolean")
    rd = m.get("report_digest")
    if rd is not None and not isinstance(rd, str):
        raise _fail("report_digest must be a string or null")
    if not isinstance(m.get("runtime", {}), dict) or not isinstance(m.get("model", {}), dict):
        raise _fail("model and runtime must be objects")

    crypto = m.get("crypto")
    if not isinstance(crypto, dict) or crypto.get("aead") != AEAD_NAME or crypto.get("kdf") != KDF_NAME:
        raise _fail("unsupported crypto suite")
    cs = crypto.get("chunk_size")
    if not _is_int(cs) or not MIN_CHUNK_SIZE <= cs <= MAX_CHUNK_SIZE:
        raise _fail("chunk_size out of range")
    if not isinstance(crypto.get("salt"), str) or not _HEX64_RE.match(crypto["salt"]):
        raise _fail("salt must be 32 bytes of lowercase hex")

    payloads = m.get("payloads")
    if not isinstance(payloads, list) or not 1 <= len(payloads) <= MAX_PAYLOADS:
        raise _fail("payloads must be a non-empty list")
    seen: set[str] = set()
    for p in payloads:
        if not isinstance(p, dict) or set(p) != {"name", "size", "sha256"}:
            raise _fail("payload entries need exactly name, size, sha256")
        name = p["name"]
        if not isinstance(name, str) or not PAYLOAD_NAME_RE.match(name) or name in seen:
            raise _fail("payload names must be unique [A-Za-z0-9._-]")
        seen.add(name)
        if not _is_int(p["size"]) or not 0 <= p["size"] <= MAX_JSON_INT:
            raise _fail(f"payload {name!r} has a bad size")
        if not isinstance(p["sha256"], str) or not _HEX64_RE.match(p["sha256"]):
            raise _fail(f"payload {name!r} has a bad sha256")


def build_manifest(
    manifest_fields: dict[str, Any],
    *,
    version: int,
    created_at: int,
    expires_at: int | None,
    payloads: list[dict[str, Any]],
    chunk_size: int,
    salt: bytes,
) -> dict[str, Any]:
    """Merge caller metadata with writer-owned fields, then validate."""
    clash = RESERVED_KEYS.intersection(manifest_fields)
    if clash:
        raise ValueError(f"manifest_fields may not set reserved keys: {sorted(clash)}")
    m: dict[str, Any] = {"report_digest": None, "forced": False, "model": {}, "runtime": {}}
    m.update(manifest_fields)
    m.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        version=version,
        created_at=created_at,
        expires_at=expires_at,
        payloads=payloads,
        crypto={"aead": AEAD_NAME, "kdf": KDF_NAME, "chunk_size": chunk_size, "salt": salt.hex()},
    )
    try:
        validate_manifest(m)
    except FormatError as exc:
        raise ValueError(str(exc)) from None
    return m
