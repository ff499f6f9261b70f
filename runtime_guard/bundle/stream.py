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


READ_BATCH = 1024 * 1024  # bytes of ciphertext read per syscall (memory bound)
_ZEROS = bytes(READ_BATCH)


class _Hasher:
    """SHA-256 of the plaintext, computed from small reusable buffers.

    Each batch of chunks is decrypted into a ~1 MiB slot that stays in cache,
    hashed from there and appended to the output, so the plaintext is written to
    its final place exactly once and never re-read from memory. With
    ``threaded`` the hashing runs on a helper thread (hashlib releases the GIL)
    over a ring of slots, overlapping with decryption of the next batch.
    """

    SLOTS = 3

    def __init__(self, slot_bytes: int, threaded: bool) -> None:
        self._h = hashlib.sha256()
        self._bufs = [bytearray(slot_bytes) for _ in range(self.SLOTS if threaded else 1)]
        self._views = [memoryview(b) for b in self._bufs]
        self._q: "queue.SimpleQueue[tuple[int, int] | None] | None" = None
        self._free: "queue.SimpleQueue[int]" = queue.SimpleQueue()
        for i in range(len(self._bufs)):
            self._free.put(i)
        if threaded:
            self._q = queue.SimpleQueue()
            self._t = threading.Thread(target=self._run, name="bundle-sha256", daemon=True)
            self._t.start()

    def _run(self) -> None:
        assert self._q is not None
        while (item := self._q.get()) is not None:
            self._h.update(self._views[item[0]][:item[1]])
            self._free.put(item[0])

    def slot(self) -> tuple[int, memoryview]:
        """A slot nobody reads any more (waits for the hash thread if needed)."""
        i = self._free.get()
        return i, self._views[i]

    def submit(self, i: int, n: int) -> None:
        """Slot ``i`` holds the next ``n`` plaintext bytes: hash them."""
        if self._q is not None:
            self._q.put((i, n))
        else:
            self._h.update(self._views[i][:n])
            self._free.put(i)

    def digest(self) -> bytes:
        self.close()
        return self._h.digest()

    def close(self) -> None:
        if self._q is not None:
            self._q.put(None)
            self._t.join()
            self._q = None

    def wipe(self) -> None:
        """Zero the slots (they held plaintext)."""
        for v in self._views:
            v[:] = _ZEROS[:len(v)] if len(v) <= len(_ZEROS) else bytes(len(v))
            v.release()


def _wipe(out: io.BytesIO) -> None:
    """Overwrite everything written so far with zeros, in place."""
    n = out.tell()
    out.seek(0)
    while n > 0:
        k = min(n, len(_ZEROS))
        out.write(_ZEROS[:k])
        n -= k


def decrypt_payload(
    key: bytes,
    aad: bytes,
    read: Callable[[int, int], "bytes | memoryview"],
    offset: int,
    size: int,
    chunk_size: int,
    expected_sha256: bytes,
    name: str,
) -> bytes:
    """Authenticate and decrypt one payload chunk by chunk into one ``bytes``.

    ``read(offset, n)`` supplies ciphertext; at most READ_BATCH bytes of it
    are held at a time. The SHA-256 of the plaintext is checked against the signed
    manifest too: AEAD keys are symmetric, so anyone holding the KEK could
    re-encrypt a chunk, but only the publisher can sign a digest.

    The output is an ``io.BytesIO`` whose ``getvalue()`` hands over its own
    buffer when nothing else references it (CPython), so the plaintext is not
    copied a second time; on any failure what was written is zeroed first.
    """
    aead = AESGCM(key)
    n = chunk_count(size, chunk_size)
    per_read = max(1, READ_BATCH // (chunk_size + TAG_LEN))  # whole chunks per read
    span = min(size, per_read * chunk_size)  # plaintext bytes per batch
    batches = -(-n // per_read)
    hasher = _Hasher(span, threaded=batches >= 4)
    out = io.BytesIO()
    pos = offset
    try:
        for first in range(0, n, per_read):
            last = min(n, first + per_read)
            want = sum(min(chunk_size, size - i * chunk_size) + TAG_LEN for i in range(first, last))
            batch = memoryview(read(pos, want))
            if len(batch) != want:
                raise TamperError(f"payload {name!r}: ciphertext is truncated", check="truncated")
            pos += want
            slot_id, buf = hasher.slot()
            boff = poff = 0
            for i in range(first, last):
                plen = min(chunk_size, size - i * chunk_size)
                ct = batch[boff:boff + plen + TAG_LEN]
                boff += plen + TAG_LEN
                try:
                    aead.decrypt_into(chunk_nonce(i, i == n - 1), ct, aad, buf[poff:poff + plen])
                except InvalidTag:
                    hasher.submit(slot_id, 0)
                    raise TamperError(
                        f"payload {name!r}: chunk {i} failed authentication", check="chunk-auth"
                    ) from None
                poff += plen
            out.write(buf[:poff])
            hasher.submit(slot_id, poff)
        if not hmac.compare_digest(hasher.digest(), expected_sha256):
            raise TamperError(f"payload {name!r}: SHA-256 does not match manifest", check="digest")
    except BaseException:
        hasher.close()
        hasher.wipe()
        _wipe(out)  # don't leave unauthenticated plaintext lying around
        raise
    hasher.wipe()
    return out.getvalue()
