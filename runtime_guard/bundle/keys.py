"""Key generation, loading and data-key wrapping.

Two key roles:
* Ed25519 signing key (publisher) / public key (pinned on device): authenticity.
* KEK (device): wraps the random per-bundle data key. Either 32 raw bytes
  (file or environment variable) or a passphrase stretched with scrypt.

Secret files must be regular files with no group/other permission bits; a
looser file is refused rather than trusted.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import BundleKeyError, FormatError
from ..fileio import read_regular_file
from .format import (
    KEK_BLOCK_AAD_LEN,
    KEK_KIND_RAW,
    KEK_KIND_SCRYPT,
    KEY_LEN,
    WRAP_CONTEXT,
    KekBlock,
)

PathLike = Union[str, os.PathLike[str]]
MAX_SECRET_FILE = 64 * 1024
DEFAULT_SCRYPT_LOG2N = 15
SCRYPT_LOG2N_RANGE = (14, 20)  # loader refuses weaker or DoS-sized parameters
SCRYPT_R, SCRYPT_P = 8, 1


@dataclass(frozen=True)
class Kek:
    """A key-encryption key. For passphrases the actual key is derived per
    bundle (salt lives in the bundle header), so we carry the passphrase."""

    kind: Literal["raw", "passphrase"]
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.kind == "raw" and len(self.secret) != KEY_LEN:
            raise BundleKeyError("raw KEK must be exactly 32 bytes", check="kek-format")
        if self.kind == "passphrase" and not self.secret:
            raise BundleKeyError("empty passphrase", check="kek-format")
        if self.kind not in ("raw", "passphrase"):
            raise BundleKeyError("unknown KEK kind", check="kek-format")


KekLike = Union[Kek, bytes]


def as_kek(kek: KekLike) -> Kek:
    """Accept a Kek or 32 raw bytes."""
    if isinstance(kek, Kek):
        return kek
    if isinstance(kek, (bytes, bytearray)):
        return Kek("raw", bytes(kek))
    raise BundleKeyError("kek must be a Kek or 32 raw bytes", check="kek-format")


# --- generation --------------------------------------------------------------

def generate_signing_keypair(password: bytes | None = None) -> tuple[bytes, bytes]:
    """New Ed25519 keypair as (PKCS#8 private PEM, SubjectPublicKeyInfo PEM)."""
    key = Ed25519PrivateKey.generate()
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


def generate_kek() -> bytes:
    """32 random bytes from the OS CSPRNG."""
    return os.urandom(KEY_LEN)


def write_secret_file(path: PathLike, data: bytes) -> None:
    """Create ``path`` with mode 0600; refuse to overwrite or follow symlinks."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(Path(path), flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask can only narrow it, but be explicit
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


# --- loading -----------------------------------------------------------------

def read_secret_file(path: PathLike) -> bytes:
    """Read a private file; refuse symlinks, non-regular files and modes wider than 0600."""
    try:
        # O_NONBLOCK: a FIFO at the key path must not block the open (fstat refuses it below)
        fd = os.open(Path(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BundleKeyError(f"cannot open key file: {exc.strerror}", check="key-file") from None
    try:
        st = os.fstat(fd)  # fstat on the open fd: no check/use race
        if not stat.S_ISREG(st.st_mode):
            raise BundleKeyError("key file is not a regular file", check="key-file")
        if st.st_mode & 0o077:
            raise BundleKeyError(
                f"key file permissions {stat.S_IMODE(st.st_mode):04o} are wider than 0600",
                check="key-permissions")
        if st.st_size > MAX_SECRET_FILE:
            raise BundleKeyError("key file is too large", check="key-file")
        chunks = []
        while True:
            b = os.read(fd, MAX_SECRET_FILE + 1)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_private_key(path: PathLike, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load the publisher's Ed25519 PKCS#8 PEM key from a 0600 file."""
    pem = read_secret_file(path)
    try:
        key = serialization.load_pem_private_key(pem, password=password)
    except (ValueError, TypeError):
        raise BundleKeyError("cannot load private key (bad PEM or password)", check="key-file") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleKeyError("private key is not Ed25519", check="key-file")
    return key


def coerce_public_key(key: Union[Ed25519PublicKey, bytes, str, os.PathLike[str]]) -> Ed25519PublicKey:
    """Ed25519PublicKey from an object, PEM bytes, 32 raw bytes, or a PEM file path."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        return load_public_key(key)
    if isinstance(key, (bytes, bytearray)):
        key = bytes(key)
        try:
            if len(key) == 32:
                return Ed25519PublicKey.from_public_bytes(key)
            obj = serialization.load_pem_public_key(key)
        except (ValueError, TypeError):
            raise BundleKeyError("cannot parse public key", check="public-key") from None
        if not isinstance(obj, Ed25519PublicKey):
            raise BundleKeyError("public key is not Ed25519", check="public-key")
        return obj
    raise BundleKeyError("unsupported public key type", check="public-key")


def load_public_key(path: PathLike) -> Ed25519PublicKey:
    """Load a pinned Ed25519 public key (PEM). Not secret: no mode check."""
    try:
        pem, _ = read_regular_file(path, 64 * 1024)
    except OSError as exc:
        raise BundleKeyError(f"cannot read public key: {exc.strerror}", check="public-key") from None
    return coerce_public_key(pem)


def _decode_raw_kek(data: bytes) -> bytes:
    """32 raw bytes, or 64 hex chars, or base64 of 32 bytes (whitespace trimmed)."""
    if len(data) == KEY_LEN:
        return data
    text = data.strip()
    try:
        if len(text) == 2 * KEY_LEN:
            return binascii.unhexlify(text)
        raw = base64.b64decode(text, altchars=b"-_" if b"-" in text or b"_" in text else None,
                               validate=True)
        if len(raw) == KEY_LEN:
            return raw
    except (binascii.Error, ValueError):
        pass
    raise BundleKeyError("KEK must be 32 bytes (raw, hex or base64)", check="kek-format")


def load_kek(file: PathLike | None = None, env: str | None = None,
             passphrase: str | bytes | None = None) -> Kek:
    """Exactly one source: a 0600 key file, an environment variable name, or a passphrase."""
    if sum(x is not None for x in (file, env, passphrase)) != 1:
        raise BundleKeyError("give exactly one of file, env, passphrase", check="kek-source")
    if file is not None:
        return Kek("raw", _decode_raw_kek(read_secret_file(file)))
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise BundleKeyError(f"environment variable {env} is not set", check="kek-source")
        return Kek("raw", _decode_raw_kek(value.encode("ascii", "replace")))
    pw = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)  # type: ignore[arg-type]
    return Kek("passphrase", pw)


# --- wrapping ----------------------------------------------------------------

def _scrypt(passphrase: bytes, salt: bytes, log2n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_LEN, n=1 << log2n, r=r, p=p).derive(passphrase)


def _wrap_aad(prefix: bytes, params: bytes) -> bytes:
    return WRAP_CONTEXT + prefix + params


def wrap_data_key(kek: KekLike, data_key: bytes, prefix: bytes,
                  scrypt_log2n: int = DEFAULT_SCRYPT_LOG2N) -> KekBlock:
    """Seal the data key under the KEK; AAD binds header prefix + KDF parameters."""
    kek = as_kek(kek)
    salt = os.urandom(16)
    if kek.kind == "raw":
        kind, log2n, r, p, salt = KEK_KIND_RAW, 0, 0, 0, bytes(16)
        wrap_key = kek.secret
    else:
        if not SCRYPT_LOG2N_RANGE[0] <= scrypt_log2n <= SCRYPT_LOG2N_RANGE[1]:
            raise ValueError("scrypt_log2n out of the supported range")
        kind, log2n, r, p = KEK_KIND_SCRYPT, scrypt_log2n, SCRYPT_R, SCRYPT_P
        wrap_key = _scrypt(kek.secret, salt, log2n, r, p)
    nonce = os.urandom(12)
    params = KekBlock(kind, log2n, r, p, salt, bytes(12), bytes(48)).pack()[:KEK_BLOCK_AAD_LEN]
    wrapped = AESGCM(wrap_key).encrypt(nonce, data_key, _wrap_aad(prefix, params))
    return KekBlock(kind, log2n, r, p, salt, nonce, wrapped)


def unwrap_data_key(kek: KekLike, block_raw: bytes, prefix: bytes) -> bytes:
    """Recover the data key. Call only after the signature over the block verified."""
    kek = as_kek(kek)
    block = KekBlock.unpack(block_raw)
    if block.kind == KEK_KIND_RAW:
        if kek.kind != "raw":
            raise BundleKeyError("bundle needs a raw KEK, got a passphrase", check="kek-kind")
        wrap_key = kek.secret
    elif block.kind == KEK_KIND_SCRYPT:
        if kek.kind != "passphrase":
            raise BundleKeyError("bundle needs a passphrase KEK, got a raw key", check="kek-kind")
        lo, hi = SCRYPT_LOG2N_RANGE
        if not lo <= block.scrypt_log2n <= hi or not 1 <= block.scrypt_r <= 16 or not 1 <= block.scrypt_p <= 4:
            raise FormatError("scrypt parameters out of range", check="kek-block")
        wrap_key = _scrypt(kek.secret, block.salt, block.scrypt_log2n, block.scrypt_r, block.scrypt_p)
    else:
        raise FormatError("unknown KEK kind in header", check="kek-block")
    try:
        data_key = AESGCM(wrap_key).decrypt(
            block.nonce, block.wrapped, _wrap_aad(prefix, block_raw[:KEK_BLOCK_AAD_LEN]))
    except InvalidTag:
        raise BundleKeyError("wrong KEK: data key did not unwrap", check="kek-unwrap") from None
    return data_key
