"""in-toto attestation (Statement v1 in a DSSE envelope) binding a bundle to its audit.

Produced at packaging (``edgeward package`` writes ``<bundle>.intoto.json``), signed with
the release's Ed25519 key, and checked by the device updater before a bundle is loaded.
The statement's subject is the SHA-256 of the bundle file; its predicate carries the
digest of the audit report and the policy verdict. A device (or a registry) refuses a
bundle whose attestation does not verify, names another file, carries another report
digest than the signed manifest, or records a failed or forced policy verdict.

The envelope is standard DSSE (PAE over ``payloadType`` and the payload, base64 in JSON),
so in-toto / sigstore tooling (e.g. securesystemslib's ``dsse.Envelope``) reads it;
it needs nothing here but ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import UpdateError

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://edgeward.dev/attestation/audit/v1"
MAX_ENVELOPE = 1 << 20


def keyid(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key (hex): names the key in the envelope, never trusted alone."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def statement(bundle_name: str, bundle_sha256: str, report_digest: str | None,
              verdict: dict[str, Any]) -> dict[str, Any]:
    """The in-toto Statement: subject = the bundle file, predicate = audit digest + verdict.

    ``verdict``: ``passed`` (bool), ``forced`` (bool), ``failed_checks`` (list of ids),
    optionally ``headline``."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": bundle_name, "digest": {"sha256": bundle_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"report_digest": {"sha256": report_digest} if report_digest else None,
                      "verdict": verdict},
    }


def sign(stmt: dict[str, Any], private_key: Ed25519PrivateKey | bytes) -> bytes:
    """DSSE envelope (JSON bytes) over the canonical statement; the key as an object or
    unencrypted PKCS#8 PEM bytes (what ``write_bundle`` accepts)."""
    if isinstance(private_key, (bytes, bytearray)):
        loaded = serialization.load_pem_private_key(bytes(private_key), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError("release key is not Ed25519")
        private_key = loaded
    payload = json.dumps(stmt, sort_keys=True, separators=(",", ":")).encode()
    sig = private_key.sign(pae(PAYLOAD_TYPE, payload))
    env = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
           "signatures": [{"keyid": keyid(private_key.public_key()),
                           "sig": base64.b64encode(sig).decode()}]}
    return json.dumps(env, sort_keys=True, indent=1).encode()


def verify(envelope: bytes, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The statement, if some signature verifies under the pinned key; else ``UpdateError``."""
    if len(envelope) > MAX_ENVELOPE:
        raise UpdateError("attestation is too large", check="attestation-format")
    try:
        env = json.loads(envelope)
        if env["payloadType"] != PAYLOAD_TYPE:
            raise UpdateError(f"attestation payloadType {env['payloadType']!r} is not in-toto",
                              check="attestation-format")
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env["signatures"]]
    except UpdateError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise UpdateError("attestation is not a DSSE envelope", check="attestation-format") from None
    message = pae(PAYLOAD_TYPE, payload)
    for sig in sigs:
        try:
            public_key.verify(sig, message)
            break
        except InvalidSignature:
            continue
    else:
        raise UpdateError("attestation is not signed by the release key", check="attestation-signature")
    try:
        stmt = json.loads(payload)
        if stmt["_type"] != STATEMENT_TYPE or stmt["predicateType"] != PREDICATE_TYPE:
            raise KeyError
        if not isinstance(stmt["subject"], list) or not isinstance(stmt["predicate"]["verdict"], dict):
            raise KeyError
    except (ValueError, KeyError, TypeError):
        raise UpdateError("attestation statement is not an edgeward audit statement",
                          check="attestation-format") from None
    out: dict[str, Any] = stmt
    return out


def check(envelope: bytes, public_key: Ed25519PublicKey, bundle_sha256: str,
          manifest_report_digest: str | None) -> dict[str, Any]:
    """Verify and apply the device policy: subject is this bundle, the report digest is the
    one the signed manifest carries, the verdict passed and was not forced."""
    stmt = verify(envelope, public_key)
    digests = [s.get("digest", {}).get("sha256") for s in stmt["subject"] if isinstance(s, dict)]
    if bundle_sha256 not in digests:
        raise UpdateError("attestation is about another file", check="attestation-subject")
    pred = stmt["predicate"]
    attested = (pred.get("report_digest") or {}).get("sha256")
    if attested != manifest_report_digest:
        raise UpdateError("attested audit report is not the one in the bundle manifest",
                          check="attestation-report")
    verdict = pred["verdict"]
    if verdict.get("passed") is not True or verdict.get("forced") is not False:
        failed = verdict.get("failed_checks") or []
        raise UpdateError(f"attested audit verdict is not a pass (forced={verdict.get('forced')}, "
                          f"failed: {', '.join(map(str, failed[:3])) or '-'})", check="attestation-verdict")
    return stmt
