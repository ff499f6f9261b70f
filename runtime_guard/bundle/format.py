"""Byte layout of a bundle file (v1) and the fixed-size header parser.

Layout (all integers big-endian; see docs/bundle-format.md)::

    magic     8   b"EDGWBNDL"
    version   2   u16 = 1
    flags     2   u16 = 0 (reserved)
    kek_block 80  key-wrapping block (KekBlock)
    mlen      4   u32 length of the manifest
    manifest  mlen  canonical JSON (UTF-8)
    signature 64  Ed25519 over SIG_CONTEXT || bytes[0 : 96 + mlen]
    payloads  ... chunked AEAD ciphertexts, in manifest order, no framing

Everything before the signature is signed, so no unsigned byte influences how
the payload region is located or decrypted.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import FormatError

_HAVE_PREADV = hasattr(os, "preadv")

MAGIC = b"EDGWBNDL"
FORMAT_VERSION = 1
PREFIX = struct.Struct(">8sHH")  # magic, version, flags
PREFIX_LEN = PREFIX.size  # 12
KEK_BLOCK = struct.Struct(">BBBB16s12s48s")  # kind, log2n, r, p, salt, nonce, wrapped
KEK_BLOCK_LEN = KEK_BLOCK.size  # 80
KEK_BLOCK_AAD_LEN = 20  # kind..salt: the parameters the wrap AEAD binds
MLEN = struct.Struct(">I")
MANIFEST_OFFSET = PREFIX_LEN + KEK_BLOCK_LEN + MLEN.size  # 96
SIGNATURE_LEN = 64
MAX_MANIFEST_LEN = 1 << 20  # 1 MiB: manifests are metadata, not data

KEK_KIND_RAW = 1
KEK_KIND_SCRYPT = 2

TAG_LEN = 16  # AES-GCM tag
KEY_LEN = 32
DEFAULT_CHUNK_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 64  # small sizes exist for tests; writer default is 64 KiB
MAX_CHUNK_SIZE = 16 * 1024 * 1024

# Domain-separation labels: a signature/key/AAD made for one purpose never
# verifies for another.
SIG_CONTEXT = b"edgeward/bundle/v1/signature\x00"
WRAP_CONTEXT = b"edgeward/bundle/v1/wrap\x00"
PAYLOAD_KEY_CONTEXT = b"edgeward/bundle/v1/payload-key\x00"
CHUNK_AAD_CONTEXT = b"edgeward/bundle/v1/chunk\x00"


@dataclass(frozen=True)
class KekBlock:
    """How the data key is wrapped. Signed, but only parsed after verification."""

    kind: int
    scrypt_log2n: int
    scrypt_r: int
    scrypt_p: int
    salt: bytes
    nonce: bytes
    wrapped: bytes

    def pack(self) -> bytes:
        return KEK_BLOCK.pack(self.kind, self.scrypt_log2n, self.scrypt_r,
                              self.scrypt_p, self.salt, self.nonce, self.wrapped)

    @classmethod
    def unpack(cls, raw: bytes) -> "KekBlock":
        if len(raw) != KEK_BLOCK_LEN:
            raise FormatError("kek block has the wrong length", check="kek-block")
        return cls(*KEK_BLOCK.unpack(raw))


@dataclass(frozen=True)
class Header:
    """The parsed, not yet verified, head of a bundle."""

    version: int
    flags: int
    kek_block: bytes
    manifest: bytes
    signature: bytes
    signed: bytes  # bytes[0 : start of signature]

    @property
    def payload_offset(self) -> int:
        return len(self.signed) + SIGNATURE_LEN


class Source:
    """Random access to bundle bytes, from memory or an open file descriptor.

    Files are read with pread on one descriptor so that what we verified is what
    we decrypt (no re-open between checks).
    """

    def __init__(self, path_or_bytes: Union[str, os.PathLike[str], bytes, bytearray, memoryview]):
        self._fd: int | None = None
        self._mem: memoryview | None = None
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            self._mem = memoryview(path_or_bytes).cast("B")
            self.size = len(self._mem)
        elif isinstance(path_or_bytes, (str, os.PathLike)):
            # O_NONBLOCK: opening a FIFO (or a device) without it blocks until a writer
            # appears, i.e. forever for a planted special file. fstat on the descriptor
            # we opened (not a path stat: no race) refuses anything but a regular file
            # before the first read; regular files ignore O_NONBLOCK for reads.
            flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
            try:
                self._fd = os.open(Path(path_or_bytes), flags)
            except OSError as exc:
                raise FormatError(f"cannot open bundle: {exc.strerror}", check="io") from None
            try:
                st = os.fstat(self._fd)
            except OSError as exc:
                self.close()
                raise FormatError(f"cannot stat bundle: {exc.strerror}", check="io") from None
            if not stat.S_ISREG(st.st_mode):
                self.close()
                raise FormatError("bundle is not a regular file", check="io")
            self.size = st.st_size
        else:
            raise TypeError("bundle must be a path or bytes")

    def read(self, offset: int, n: int) -> bytes:
        """Exactly n bytes at offset, or fewer if the source ends first."""
        if self._mem is not None:
            return bytes(self._mem[offset:offset + n])
        assert self._fd is not None
        parts, got = [], 0
        while got < n:
            try:
                b = os.pread(self._fd, n - got, offset + got)
            except OSError as exc:
                raise FormatError(f"cannot read bundle: {exc.strerror}", check="io") from None
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the count (short only at the end).

        Files use ``os.preadv`` straight into ``buf`` (no intermediate bytes,
        and the GIL is released during the copy).
        """
        n = len(buf)
        if self._mem is not None:
            got = max(0, min(n, self.size - offset))
            buf[:got] = self._mem[offset:offset + got]
            return got
        assert self._fd is not None
        got = 0
        while got < n:
            try:
                if _HAVE_PREADV:
                    k = os.preadv(self._fd, [buf[got:]], offset + got)
                else:  # pragma: no cover - platforms without preadv
                    b = os.pread(self._fd, n - got, offset + got)
                    buf[got:got + len(b)] = b
                    k = len(b)
            except OSError as exc:
                raise FormatError(f"cannot read bundle: {exc.strerror}", check="io") from None
            if k == 0:
                break
            got += k
        return got

    def view(self, offset: int, n: int) -> memoryview | bytes:
        """Like read() but zero-copy for in-memory sources."""
        if self._mem is not None:
            return self._mem[offset:offset + n]
        return self.read(offset, n)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_header(src: Source) -> Header:
    """Split the signed head off a bundle. Raises FormatError only."""
    head = src.read(0, MANIFEST_OFFSET)
    if len(head) < PREFIX_LEN:
        raise FormatError("file too short for a bundle header", check="truncated-header")
    magic, version, flags = PREFIX.unpack(head[:PREFIX_LEN])
    if magic != MAGIC:
        raise FormatError("bad magic: not an edgeward bundle", check="magic")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported bundle format version {version}", check="version")
    if flags != 0:
        raise FormatError("reserved header flags are set", check="flags")
    if len(head) < MANIFEST_OFFSET:
        raise FormatError("file too short for a bundle header", check="truncated-header")
    (mlen,) = MLEN.unpack(head[PREFIX_LEN + KEK_BLOCK_LEN:])
    if mlen == 0 or mlen > MAX_MANIFEST_LEN:
        raise FormatError(f"manifest length {mlen} out of range", check="manifest-length")
    sig_off = MANIFEST_OFFSET + mlen
    if src.size < sig_off + SIGNATURE_LEN:
        raise FormatError("file too short for manifest and signature", check="truncated-header")
    manifest = src.read(MANIFEST_OFFSET, mlen)
    signature = src.read(sig_off, SIGNATURE_LEN)
    return Header(
        version=version,
        flags=flags,
        kek_block=head[PREFIX_LEN:PREFIX_LEN + KEK_BLOCK_LEN],
        manifest=manifest,
        signature=signature,
        signed=head + manifest,
    )


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks for a payload; an empty payload is one empty final chunk (like age)."""
    return max(1, -(-size // chunk_size))


def ciphertext_len(size: int, chunk_size: int) -> int:
    return size + TAG_LEN * chunk_count(size, chunk_size)


def chunk_nonce(index: int, last: bool) -> bytes:
    """96-bit nonce: 88-bit big-endian chunk counter || last-chunk flag (age STREAM)."""
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")
