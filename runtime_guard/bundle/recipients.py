"""Per-device key wrapping: one signed bundle, its KEK sealed to several devices (like age).

``<bundle>.recipients.json`` holds, per device id, the bundle's raw KEK sealed to that
device's X25519 public key: an ephemeral X25519 key per entry, HKDF-SHA256 over the
shared secret (salt = ephemeral || recipient public key), AES-256-GCM with AAD binding
the device id and the bundle's manifest digest. A device opens its entry with its
private key (a 0600 file) and then the bundle exactly as with a KEK file.

What it protects: a device left out of a release's recipients cannot decrypt that
release (give each release a fresh KEK: ``edgeward recipients`` does), without
re-signing per device. What it does not: a device can still decrypt every release it
*was* a recipient of, and the models it runs are in its memory; the file is not signed
and needs no signature for confidentiality (a swapped entry yields a KEK that fails the
bundle's own signed key wrap, i.e. a refusal, never another model).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import BundleKeyError
from .keys import Kek, read_secret_file

FORMAT = "edgeward.recipients/1"
INFO = b"edgeward/recipients/v1/wrap"
MAX_FILE = 4 << 20


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(shared: bytes, epk: bytes, rpk: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=epk + rpk, info=INFO).derive(shared)


def _aad(device_id: str, manifest_sha256: str) -> bytes:
    return b"edgeward/recipients/v1\0" + device_id.encode() + b"\0" + manifest_sha256.encode()


def generate_device_key() -> tuple[bytes, bytes]:
    """(private key file content: 64 hex chars, public key PEM)."""
    k = X25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())
    pub = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv.hex().encode() + b"\n", pub


def load_device_public_key(pem: bytes) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise BundleKeyError("cannot parse device public key", check="public-key") from None
    if not isinstance(key, X25519PublicKey):
        raise BundleKeyError("device public key is not X25519", check="public-key")
    return key


def load_device_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """The device's X25519 private key from a 0600 file (64 hex chars)."""
    try:
        return X25519PrivateKey.from_private_bytes(binascii.unhexlify(read_secret_file(path).strip()))
    except (binascii.Error, ValueError):
        raise BundleKeyError("device key file must hold 64 hex characters", check="key-file") from None


def seal(kek: bytes, recipients: dict[str, X25519PublicKey], manifest_sha256: str) -> bytes:
    """The recipients file for one bundle (``kek``: its raw 32-byte KEK)."""
    if len(kek) != 32:
        raise BundleKeyError("recipients need a raw 32-byte KEK", check="kek-format")
    entries = []
    for device_id, pub in sorted(recipients.items()):
        eph = X25519PrivateKey.generate()
        epk, rpk = _raw(eph.public_key()), _raw(pub)
        nonce = os.urandom(12)
        wrapped = AESGCM(_key(eph.exchange(pub), epk, rpk)).encrypt(nonce, kek, _aad(device_id, manifest_sha256))
        entries.append({"id": device_id, "epk": base64.b64encode(epk).decode(),
                        "nonce": base64.b64encode(nonce).decode(), "wrapped": base64.b64encode(wrapped).decode()})
    return json.dumps({"format": FORMAT, "manifest_sha256": manifest_sha256, "recipients": entries},
                      indent=1).encode()


def kek_for_bundle(bundle: str | os.PathLike[str], device_id: str, key: X25519PrivateKey,
                   public_key: Any) -> Kek:
    """The KEK of ``bundle`` from ``<bundle>.recipients.json`` beside it (signature checked
    first, so the manifest digest the entry is bound to is the signed one)."""
    from ..errors import SignatureError
    from .reader import inspect_bundle

    info = inspect_bundle(bundle, public_key)
    if info["signature_verified"] is not True:
        raise SignatureError("bundle signature does not verify with the pinned key")
    path = os.fspath(bundle) + ".recipients.json"
    try:
        with open(path, "rb") as f:
            doc = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise BundleKeyError(f"no recipients file beside the bundle: {exc.strerror}", check="recipients") from None
    return open_for(doc, device_id, key, str(info["manifest_sha256"]))


def open_for(doc: bytes, device_id: str, key: X25519PrivateKey, manifest_sha256: str) -> Kek:
    """This device's KEK for the bundle with ``manifest_sha256``; ``BundleKeyError`` if the
    device is not a recipient (e.g. revoked) or its entry does not open."""
    if len(doc) > MAX_FILE:
        raise BundleKeyError("recipients file is too large", check="recipients")
    try:
        obj: dict[str, Any] = json.loads(doc)
        if obj.get("format") != FORMAT:
            raise ValueError
        entry = next((e for e in obj["recipients"] if e.get("id") == device_id), None)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise BundleKeyError("not a recipients file", check="recipients") from None
    if entry is None:
        raise BundleKeyError(f"device {device_id!r} is not a recipient of this bundle", check="not-a-recipient")
    try:
        epk = base64.b64decode(entry["epk"], validate=True)
        nonce = base64.b64decode(entry["nonce"], validate=True)
        wrapped = base64.b64decode(entry["wrapped"], validate=True)
        shared = key.exchange(X25519PublicKey.from_public_bytes(epk))
        kek = AESGCM(_key(shared, epk, _raw(key.public_key()))).decrypt(
            nonce, wrapped, _aad(device_id, manifest_sha256))
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidTag):
        raise BundleKeyError("recipients entry does not open with this device key", check="recipient-unwrap") from None
    return Kek("raw", kek)
