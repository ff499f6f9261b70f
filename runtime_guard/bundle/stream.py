"""Chunked AEAD (STREAM construction, as in age / Tink streaming AEAD).

Each payload gets its own AES-256-GCM key, HKDF-derived from the bundle's data
key with the payload name in ``info``. Chunk i is sealed with nonce
``i || last_flag`` and AAD ``context || manifest_sha256 || payload_name``, so a
chunk only authenticates at its own index, in its own payload, in its own
bundle; dropping the final chunk (truncation) or appending one fails.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import queue
import threading
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import TamperError
from .format import (
    CHUNK_AAD_CONTEXT,
    KEY_LEN,
    PAYLOAD_KEY_CONTEXT,
    TAG_LEN,
    chunk_count,
    chunk_nonce,
)


def derive_payload_key(data_key: bytes, salt: bytes, name: str) -> bytes:
    """Per-payload key: HKDF-SHA256(data_key, salt, info=context || name)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt,
        info=PAYLOAD_KEY_CONTEXT + name.encode("utf-8"),
    ).derive(data_key)


def payload_aad(manifest_sha256: bytes, name: str) -> bytes:
    """AAD shared by every chunk of one payload in one bundle."""
    return CHUNK_AAD_CONTEXT + manifest_sha256 + name.encode("utf-8")


def encrypt_chunks(key: bytes, aad: bytes, plaintext: bytes, chunk_size: int) -> Iterator[bytes]:
    """Yield sealed chunks; memory per step is one chunk."""
    aead = AESGCM(key)
    n = chunk_count(len(plaintext), chunk_size)
    mv = memoryview(plaintext)
    for i in range(n):
        piece = mv[i * chunk_size:(i + 1) * chunk_size]
        yield aead.encrypt(chunk_nonce(i, i == n - 1), piece, aad)


READ_BATCH = 1024 * 1024  # bytes of ciphertext per read call / per hashing step
THREADED_MIN_BATCHES = 4  # below this, helper threads cost more than they save
_ZEROS = memoryview(bytes(READ_BATCH))  # calloc'd, shared, read-only

ReadInto = Callable[[int, memoryview], int]


def _reader_from_read(read: Callable[[int, int], "bytes | memoryview"]) -> ReadInto:
    """Adapt ``read(offset, n) -> bytes`` to ``readinto(offset, view) -> count``."""
    def readinto(offset: int, view: memoryview) -> int:
        got = read(offset, len(view))
        view[:len(got)] = got
        return len(got)
    return readinto


def _zero(view: memoryview, end: int) -> None:
    """Overwrite view[0:end] with zeros, in place."""
    pos = 0
    while pos < end:
        k = min(end - pos, len(_ZEROS))
        view[pos:pos + k] = _ZEROS[:k]
        pos += k


class _Pipeline:
    """Helper threads for large payloads: one reads ciphertext ahead into the
    output buffer (``os.preadv`` releases the GIL, so the page faults of the
    fresh buffer and the copy from the page cache run on the other core), one
    hashes finished plaintext (hashlib releases the GIL). The decrypting thread
    (AES-GCM holds the GIL) only waits when it catches up with the reader.

    Regions never overlap: the reader writes ciphertext of batches ahead of the
    decryptor, the decryptor writes plaintext at or below the ciphertext it has
    just consumed, and the hasher reads plaintext nobody writes any more.
    """

    def __init__(self, readinto: ReadInto, view: memoryview, offset: int,
                 batches: list[tuple[int, int]], threaded: bool,
                 batch_digests: list[bytes] | None = None) -> None:
        self._readinto, self._view, self._offset = readinto, view, offset
        self._batches = batches  # (start in buffer, length) of each batch's ciphertext
        self._h = hashlib.sha256()
        self._batch_digests = batch_digests  # SHA-256 of each batch's plaintext, if asked for
        self._stop: threading.Event | None = None
        self._threads: list[threading.Thread] = []
        self._reads: "queue.SimpleQueue[int | BaseException] | None" = None
        self._hashq: "queue.SimpleQueue[tuple[int, int] | None] | None" = None
        if threaded:
            self._stop = threading.Event()
            self._reads, self._hashq = queue.SimpleQueue(), queue.SimpleQueue()
            for target, tname in ((self._read_all, "bundle-read"), (self._hash_all, "bundle-sha256")):
                t = threading.Thread(target=target, name=tname, daemon=True)
                t.start()
                self._threads.append(t)

    def _read_one(self, start: int, length: int) -> int:
        return self._readinto(self._offset + start, self._view[start:start + length])

    def _read_all(self) -> None:
        assert self._reads is not None and self._stop is not None
        for start, length in self._batches:
            if self._stop.is_set():
                return
            try:
                got = self._read_one(start, length)
            except BaseException as exc:  # surfaced on the decrypting thread
                self._reads.put(exc.with_traceback(None))  # no frames pinning the buffer
                return
            self._reads.put(got)
            if got != length:
                return

    def _hash_all(self) -> None:
        assert self._hashq is not None
        view = self._view
        while (item := self._hashq.get()) is not None:
            self._update(view[item[0]:item[1]])

    def _update(self, piece: memoryview) -> None:
        self._h.update(piece)
        if self._batch_digests is not None:
            self._batch_digests.append(hashlib.sha256(piece).digest())

    def read(self, index: int) -> int:
        """Bytes of ciphertext available for batch ``index`` (all of it unless short)."""
        if self._reads is None:
            return self._read_one(*self._batches[index])
        got = self._reads.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def hash(self, start: int, end: int) -> None:
        if self._hashq is None:
            self._update(self._view[start:end])
        else:
            self._hashq.put((start, end))

    def digest(self) -> bytes:
        self.close()
        return self._h.digest()

    def close(self) -> None:
        """Stop and join the helpers; after this nobody touches the buffer."""
        if self._stop is not None:
            self._stop.set()
        if self._hashq is not None:
            self._hashq.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        self._hashq = None


def _batches(size: int, chunk_size: int) -> tuple[int, list[tuple[int, int]]]:
    """(whole chunks per read, [(ciphertext offset in the payload, length)] per read)."""
    n = chunk_count(size, chunk_size)
    per_read = max(1, READ_BATCH // (chunk_size + TAG_LEN))
    batches, pos = [], 0
    for first in range(0, n, per_read):
        last = min(n, first + per_read)
        length = sum(min(chunk_size, size - i * chunk_size) for i in range(first, last))
        length += TAG_LEN * (last - first)
        batches.append((pos, length))
        pos += length
    return per_read, batches


def decrypt_payload(
    key: bytes,
    aad: bytes,
    read: Callable[[int, int], "bytes | memoryview"] | None,
    offset: int,
    size: int,
    chunk_size: int,
    expected_sha256: bytes,
    name: str,
    *,
    readinto: ReadInto | None = None,
    batch_digests: list[bytes] | None = None,
) -> bytes:
    """Authenticate and decrypt one payload chunk by chunk into one ``bytes``.

    Ciphertext comes from ``readinto(offset, view) -> bytes read`` (or, if not
    given, ``read(offset, n) -> bytes``). The SHA-256 of the plaintext is checked
    against the signed manifest too: AEAD keys are symmetric, so anyone holding
    the KEK could re-encrypt a chunk, but only the publisher can sign a digest.

    Memory: the payload's whole ciphertext is read straight into the buffer of
    an ``io.BytesIO`` that ends up as the returned ``bytes``. Each chunk is
    decrypted from there into a small reusable slot (cache-resident) and copied
    back to its final place, which also squeezes out the 16-byte tags; then the
    buffer is truncated to the plaintext size. The plaintext is thus written to
    fresh memory once, with no separate ciphertext buffers. The BytesIO starts
    from ``bytes(n)`` (zeroed memory from calloc, untouched until written) that
    nothing else references, and ``getvalue()`` returns the buffer itself once
    every view is released (CPython's copy-on-write BytesIO; if an interpreter
    copied instead, only speed would change). On any failure the plaintext
    written so far and the slot are zeroed before the exception propagates.

    ``batch_digests``, if given, receives the SHA-256 of each batch's plaintext (one per
    ``READ_BATCH`` of ciphertext), which ``stream_payload`` checks when it decrypts the
    payload a second time.
    """
    n = chunk_count(size, chunk_size)
    per_read, batches = _batches(size, chunk_size)
    ct_len = sum(length for _, length in batches)
    if readinto is None:
        if read is None:
            raise TypeError("decrypt_payload needs read or readinto")
        readinto = _reader_from_read(read)
    aead = AESGCM(key)
    out = io.BytesIO(bytes(ct_len))  # sole reference: BytesIO adopts it, no copy
    view = out.getbuffer()
    slot = memoryview(bytearray(min(chunk_size, max(size, 1))))
    pipe = _Pipeline(readinto, view, offset, batches, threaded=len(batches) >= THREADED_MIN_BATCHES,
                     batch_digests=batch_digests)
    src = dst = 0  # next ciphertext byte to decrypt / next plaintext byte to write
    try:
        for b, (_, blen) in enumerate(batches):
            if pipe.read(b) != blen:
                raise TamperError(f"payload {name!r}: ciphertext is truncated", check="truncated")
            first, pstart = b * per_read, dst
            for i in range(first, min(n, first + per_read)):
                plen = min(chunk_size, size - i * chunk_size)
                try:
                    aead.decrypt_into(chunk_nonce(i, i == n - 1), view[src:src + plen + TAG_LEN],
                                      aad, slot[:plen])
                except InvalidTag:
                    raise TamperError(
                        f"payload {name!r}: chunk {i} failed authentication", check="chunk-auth"
                    ) from None
                view[dst:dst + plen] = slot[:plen]  # in cache; overwrites consumed ciphertext
                src += plen + TAG_LEN
                dst += plen
            pipe.hash(pstart, dst)
        if not hmac.compare_digest(pipe.digest(), expected_sha256):
            raise TamperError(f"payload {name!r}: SHA-256 does not match manifest", check="digest")
    except BaseException:
        pipe.close()
        _zero(view, dst)  # don't leave unauthenticated plaintext lying around
        _zero(slot, len(slot))
        try:
            view.release()
            out.close()
        except BufferError:  # a view still alive somewhere; the plaintext is zeroed anyway
            pass
        raise
    _zero(slot, len(slot))
    view.release()  # no views left: the buffer may be resized and handed over
    out.truncate(size)
    return out.getvalue()


def stream_payload(
    key: bytes,
    aad: bytes,
    readinto: ReadInto,
    offset: int,
    size: int,
    chunk_size: int,
    expected_sha256: bytes,
    batch_digests: list[bytes],
    name: str,
    write: Callable[[memoryview], object],
) -> None:
    """Decrypt a payload that ``decrypt_payload`` already verified a second time, handing
    its plaintext to ``write`` one batch at a time (memory: one batch, never the payload).

    A batch reaches ``write`` only after its SHA-256 equals the one recorded on the first
    pass (``batch_digests``), so the consumer sees exactly the bytes that were verified and
    admitted then, even if the file was replaced in between by someone holding the KEK
    (AEAD alone cannot tell: the key is symmetric). Any difference is a TamperError, raised
    before the batch that differs is written. The reused buffers are zeroed at the end.
    """
    n = chunk_count(size, chunk_size)
    per_read, batches = _batches(size, chunk_size)
    if len(batches) != len(batch_digests):
        raise TamperError(f"payload {name!r} changed since it was verified", check="digest")
    aead = AESGCM(key)
    longest = max(length for _, length in batches)
    ct = memoryview(bytearray(longest))
    pt = memoryview(bytearray(max(1, min(size, per_read * chunk_size))))
    h = hashlib.sha256()
    try:
        for b, (start, blen) in enumerate(batches):
            if readinto(offset + start, ct[:blen]) != blen:
                raise TamperError(f"payload {name!r}: ciphertext is truncated", check="truncated")
            src = dst = 0
            for i in range(b * per_read, min(n, (b + 1) * per_read)):
                plen = min(chunk_size, size - i * chunk_size)
                try:
                    aead.decrypt_into(chunk_nonce(i, i == n - 1), ct[src:src + plen + TAG_LEN], aad,
                                      pt[dst:dst + plen])
                except InvalidTag:
                    raise TamperError(
                        f"payload {name!r}: chunk {i} failed authentication", check="chunk-auth"
                    ) from None
                src += plen + TAG_LEN
                dst += plen
            piece = pt[:dst]
            if not hmac.compare_digest(hashlib.sha256(piece).digest(), batch_digests[b]):
                raise TamperError(f"payload {name!r} changed since it was verified", check="digest")
            h.update(piece)
            write(piece)
        if not hmac.compare_digest(h.digest(), expected_sha256):
            raise TamperError(f"payload {name!r}: SHA-256 does not match manifest", check="digest")
    finally:
        _zero(pt, len(pt))
