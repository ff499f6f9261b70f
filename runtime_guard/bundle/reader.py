"""Device side: verify, check freshness, decrypt in memory.

Order matters and is the security argument:
1. parse only fixed-size framing (FormatError),
2. verify the Ed25519 signature over header + manifest with the pinned key
   (SignatureError) -- nothing else is interpreted before this,
3. validate the manifest, expiry (ExpiredError), anti-rollback (RollbackError),
4. check the file length matches the signed payload table (TamperError),
5. unwrap the data key (BundleKeyError),
6. decrypt + authenticate chunk by chunk and verify each SHA-256 (TamperError).
Plaintext only ever lives in memory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

from cryptography.exceptions import InvalidSignature

from ..errors import ExpiredError, FormatError, SignatureError, TamperError
from .format import (
    PREFIX_LEN,
    SIG_CONTEXT,
    Header,
    KekBlock,
    Source,
    ciphertext_len,
    parse_header,
)
from .keys import KekLike, coerce_public_key, unwrap_data_key
from .manifest import manifest_digest, parse_manifest
from .rollback import RollbackState
from .stream import decrypt_payload, derive_payload_key, payload_aad, stream_payload

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from ..admission import AdmissionLimits

BundleInput = Union[str, os.PathLike[str], bytes, bytearray, memoryview]
RollbackArg = Union[RollbackState, str, os.PathLike[str], None]
MODEL_PAYLOAD = "model"
DEFAULT_MAX_TOTAL_BYTES = 2 * 1024**3  # refuse to allocate more than this


@dataclass
class OpenedBundle:
    """A verified, decrypted bundle. Call ``accept()`` once it has proven
    itself (e.g. after a smoke test) to advance the anti-rollback counter."""

    manifest: dict[str, Any]
    payloads: dict[str, bytes] = field(repr=False)
    manifest_sha256: str
    _rollback: RollbackState | None = field(default=None, repr=False)
    _sealed_model: "_SealedPayload | None" = field(default=None, repr=False)

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def model_bytes(self) -> bytes:
        try:
            return self.payloads[MODEL_PAYLOAD]
        except KeyError:
            raise FormatError("bundle has no 'model' payload", check="manifest-fields") from None

    def take_model(self) -> bytes:
        """The model payload, removed from ``payloads``: the caller's reference is then the
        last one, so the plaintext is freed as soon as the caller drops it (onnxruntime
        keeps its own copy of the weights; see admission.load_session)."""
        data = self.model_bytes
        del self.payloads[MODEL_PAYLOAD]
        return data

    def stream_model(self, write: Callable[[memoryview], object]) -> None:
        """Decrypt the model payload again from the bundle, handing it to ``write`` batch by
        batch; each batch is checked against the digests taken when the bundle was opened
        (stream.stream_payload), so ``write`` sees exactly the bytes verified then. Lets a
        caller drop the plaintext (``take_model``) before onnxruntime reads the model."""
        sealed = self._sealed_model
        if sealed is None:
            raise FormatError("bundle has no 'model' payload", check="manifest-fields")
        with Source(sealed.source) as src:
            stream_payload(sealed.key, sealed.aad, src.readinto, sealed.offset, sealed.size,
                           sealed.chunk_size, sealed.sha256, sealed.batch_digests, MODEL_PAYLOAD, write)

    def accept(self, now: int | None = None) -> None:
        """Commit this version to the anti-rollback state (no-op without state)."""
        if self._rollback is not None:
            self._rollback.accept(self.version, self.manifest_sha256, now)

    def admit(self, limits: "AdmissionLimits | None" = None, *,
              full_proto: bool = True) -> "onnx.ModelProto":
        """Admission checks on the model payload (see admission.admit_model)."""
        from ..admission import AdmissionLimits, admit_model
        return admit_model(self.model_bytes, limits or AdmissionLimits(), full_proto=full_proto)

    def open_session(self, limits: "AdmissionLimits | None" = None, intra_op_threads: int = 1,
                     inter_op_threads: int = 1) -> "onnxruntime.InferenceSession":
        """Admission checks, then a CPU-only session from the in-memory bytes
        (admission.load_session: large weights are handed over without a copy)."""
        from ..admission import load_session
        return load_session(self.model_bytes, limits, intra_op_threads, inter_op_threads)


@dataclass(frozen=True)
class _SealedPayload:
    """Where one verified payload's ciphertext is and what its plaintext hashed to."""

    source: BundleInput
    key: bytes
    aad: bytes
    offset: int
    size: int
    chunk_size: int
    sha256: bytes
    batch_digests: list[bytes]


@dataclass(frozen=True)
class _Verified:
    header: Header
    manifest: dict[str, Any]
    digest: bytes


def _as_state(state: RollbackArg) -> RollbackState | None:
    if state is None or isinstance(state, RollbackState):
        return state
    return RollbackState(state)


def _verify_head(src: Source, public_key: Any) -> _Verified:
    header = parse_header(src)
    pub = coerce_public_key(public_key)
    try:
        pub.verify(header.signature, SIG_CONTEXT + header.signed)
    except InvalidSignature:
        raise SignatureError("signature does not verify with the pinned public key",
                             check="signature") from None
    manifest = parse_manifest(header.manifest)
    return _Verified(header, manifest, manifest_digest(header.manifest))


def _check_freshness(v: _Verified, state: RollbackState | None, now: int | None) -> None:
    t = int(time.time() if now is None else now)
    exp = v.manifest.get("expires_at")
    if exp is not None and t >= exp:
        raise ExpiredError(f"bundle expired at {exp} (now {t})", check="expiry")
    if state is not None:
        state.check(v.manifest["version"], v.digest.hex())


def _expected_size(v: _Verified) -> int:
    cs = v.manifest["crypto"]["chunk_size"]
    return v.header.payload_offset + sum(ciphertext_len(p["size"], cs) for p in v.manifest["payloads"])


def open_bundle(
    path_or_bytes: BundleInput,
    public_key: Any,
    kek: KekLike,
    rollback_state: RollbackArg = None,
    now: int | None = None,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> OpenedBundle:
    """Verify and decrypt a bundle into memory. Raises a BundleError subtype.

    ``public_key``: pinned Ed25519 key (object, PEM/raw bytes or PEM path).
    ``rollback_state``: RollbackState or path; checked here, updated only by
    ``OpenedBundle.accept()``.
    """
    state = _as_state(rollback_state)
    with Source(path_or_bytes) as src:
        v = _verify_head(src, public_key)
        _check_freshness(v, state, now)
        total = sum(p["size"] for p in v.manifest["payloads"])
        if total > max_total_bytes:
            raise FormatError(f"payloads total {total} bytes, over the {max_total_bytes} limit",
                              check="size-limit")
        if src.size != _expected_size(v):
            raise TamperError("file length does not match the signed payload table "
                              "(truncated or extended)", check="length")
        data_key = unwrap_data_key(kek, v.header.kek_block, v.header.signed[:PREFIX_LEN])
        salt = bytes.fromhex(v.manifest["crypto"]["salt"])
        cs = v.manifest["crypto"]["chunk_size"]
        payloads: dict[str, bytes] = {}
        sealed: _SealedPayload | None = None
        off = v.header.payload_offset
        for p in v.manifest["payloads"]:
            name = p["name"]
            key = derive_payload_key(data_key, salt, name)
            aad, sha = payload_aad(v.digest, name), bytes.fromhex(p["sha256"])
            digests: list[bytes] | None = [] if name == MODEL_PAYLOAD else None
            payloads[name] = decrypt_payload(key, aad, None, off, p["size"], cs, sha, name,
                                             readinto=src.readinto, batch_digests=digests)
            if digests is not None:
                sealed = _SealedPayload(path_or_bytes, key, aad, off, p["size"], cs, sha, digests)
            off += ciphertext_len(p["size"], cs)
    return OpenedBundle(v.manifest, payloads, v.digest.hex(), state, sealed)


def verify_bundle(
    path_or_bytes: BundleInput,
    public_key: Any,
    kek: KekLike,
    rollback_state: RollbackArg = None,
    now: int | None = None,
    limits: "AdmissionLimits | None" = None,
) -> dict[str, Any]:
    """Everything open_bundle does plus model admission, except opening a
    session; never updates rollback state. Returns a summary (no plaintext)."""
    opened = open_bundle(path_or_bytes, public_key, kek, rollback_state, now)
    opened.admit(limits, full_proto=False)
    return {
        "ok": True,
        "manifest": opened.manifest,
        "manifest_sha256": opened.manifest_sha256,
        "version": opened.version,
        "payloads": {n: len(b) for n, b in opened.payloads.items()},
        "model_admitted": True,
    }


def inspect_bundle(path_or_bytes: BundleInput, public_key: Any = None) -> dict[str, Any]:
    """Header and manifest without any secret key. The manifest is reported
    even when unverified -- check ``signature_verified`` before trusting it."""
    with Source(path_or_bytes) as src:
        header = parse_header(src)
        verified: bool | None = None
        if public_key is not None:
            try:
                _verify_head(src, public_key)
                verified = True
            except SignatureError:
                verified = False
        manifest = parse_manifest(header.manifest)
        block = KekBlock.unpack(header.kek_block)
        v = _Verified(header, manifest, manifest_digest(header.manifest))
        return {
            "format_version": header.version,
            "flags": header.flags,
            "file_size": src.size,
            "expected_size": _expected_size(v),
            "header_size": header.payload_offset,
            "kek": {"kind": {1: "raw", 2: "scrypt"}.get(block.kind, f"unknown({block.kind})"),
                    **({"scrypt_log2n": block.scrypt_log2n, "scrypt_r": block.scrypt_r,
                        "scrypt_p": block.scrypt_p} if block.kind == 2 else {})},
            "manifest_sha256": v.digest.hex(),
            "manifest": manifest,
            "signature_verified": verified,
        }


