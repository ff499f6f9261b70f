"""Publisher side: encrypt payloads, sign header + manifest, write one file."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any, Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..fileio import atomic_write
from .format import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    KEY_LEN,
    MAGIC,
    MAX_MANIFEST_LEN,
    MLEN,
    PREFIX,
    SIG_CONTEXT,
)
from .keys import DEFAULT_SCRYPT_LOG2N, KekLike, wrap_data_key
from .manifest import build_manifest, canonical_json, manifest_digest
from .stream import derive_payload_key, encrypt_chunks, payload_aad


def _signing_key(key: Union[Ed25519PrivateKey, bytes]) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    obj = serialization.load_pem_private_key(bytes(key), password=None)
    if not isinstance(obj, Ed25519PrivateKey):
        raise TypeError("signing key must be Ed25519")
    return obj


def _bundle_parts(
    payloads: dict[str, bytes],
    manifest_fields: dict[str, Any],
    signing_key: Union[Ed25519PrivateKey, bytes],
    kek: KekLike,
    version: int,
    expires_in_s: int | None,
    *,
    now: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    scrypt_log2n: int = DEFAULT_SCRYPT_LOG2N,
) -> tuple[Iterator[bytes], dict[str, Any]]:
    """(the bundle's bytes as a lazy sequence of pieces: signed head, signature, sealed
    chunks; the manifest). Everything is validated and signed before it returns."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError("version must be a non-negative integer")
    if expires_in_s is not None and (not isinstance(expires_in_s, int) or expires_in_s <= 0):
        raise ValueError("expires_in_s must be a positive integer or None")
    if not payloads:
        raise ValueError("at least one payload is required")
    created = int(time.time() if now is None else now)
    names = sorted(payloads)  # on-disk order = manifest order
    table = [{"name": n, "size": len(payloads[n]),
              "sha256": hashlib.sha256(payloads[n]).hexdigest()} for n in names]
    salt = os.urandom(32)
    manifest = build_manifest(
        manifest_fields, version=version, created_at=created,
        expires_at=None if expires_in_s is None else created + expires_in_s,
        payloads=table, chunk_size=chunk_size, salt=salt)
    mbytes = canonical_json(manifest)
    if len(mbytes) > MAX_MANIFEST_LEN:
        raise ValueError("manifest too large")

    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0)
    data_key = os.urandom(KEY_LEN)
    kek_block = wrap_data_key(kek, data_key, prefix, scrypt_log2n).pack()
    signed = prefix + kek_block + MLEN.pack(len(mbytes)) + mbytes
    signature = _signing_key(signing_key).sign(SIG_CONTEXT + signed)
    digest = manifest_digest(mbytes)

    def pieces() -> Iterator[bytes]:
        yield signed
        yield signature
        for n in names:
            key = derive_payload_key(data_key, salt, n)
            yield from encrypt_chunks(key, payload_aad(digest, n), payloads[n], chunk_size)

    return pieces(), manifest


def build_bundle(
    payloads: dict[str, bytes],
    manifest_fields: dict[str, Any],
    signing_key: Union[Ed25519PrivateKey, bytes],
    kek: KekLike,
    version: int,
    expires_in_s: int | None = None,
    **options: Any,
) -> tuple[bytes, dict[str, Any]]:
    """Build a bundle in memory; returns (bundle bytes, manifest).

    Options: ``now``, ``chunk_size``, ``scrypt_log2n``."""
    pieces, manifest = _bundle_parts(payloads, manifest_fields, signing_key, kek, version,
                                     expires_in_s, **options)
    return b"".join(pieces), manifest


def write_bundle(
    out_path: Union[str, os.PathLike[str]],
    payloads: dict[str, bytes],
    manifest_fields: dict[str, Any],
    signing_key: Union[Ed25519PrivateKey, bytes],
    kek: KekLike,
    version: int,
    expires_in_s: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build and atomically write a bundle; returns the signed manifest.

    Options: ``now``, ``chunk_size``, ``scrypt_log2n`` (see build_bundle).
    Only ciphertext touches the disk, one sealed chunk at a time: memory beyond the
    payloads themselves stays at one chunk, not a second copy of the bundle.
    """
    pieces, manifest = _bundle_parts(payloads, manifest_fields, signing_key, kek, version,
                                     expires_in_s, **options)
    atomic_write(out_path, pieces, mode=0o644)  # ciphertext + public metadata only
    return manifest
