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


def _plain_buffer(size: int) -> memoryview:
    """A writable buffer for plaintext; zeroed on failure, copied to ``bytes`` on success."""
    return memoryview(bytearray(size))


class _Hasher:
    """SHA-256 in a helper thread, fed in large blocks.

    hashlib releases the GIL, so hashing block k overlaps with decrypting
    block k+1 on another core; blocks are big so the thread rarely needs the GIL.
    """

    BLOCK = 4 * 1024 * 1024

    def __init__(self, view: memoryview, threaded: bool) -> None:
        self._h = hashlib.sha256()
        self._view = view
        self._done = 0
        self._q: "queue.SimpleQueue[tuple[int, int] | None] | None" = None
        if threaded:
            self._q = queue.SimpleQueue()
            self._t = threading.Thread(target=self._run, name="bundle-sha256", daemon=True)
            self._t.start()

    def _run(self) -> None:
        assert self._q is not None
        while (item := self._q.get()) is not None:
            self._h.update(self._view[item[0]:item[1]])

    def advance(self, upto: int, final: bool = False) -> None:
        """Plaintext [0, upto) is final; hash it once a block has accumulated."""
        if upto - self._done < self.BLOCK and not final:
            return
        if upto > self._done:
            if self._q is not None:
                self._q.put((self._done, upto))
            else:
                self._h.update(self._view[self._done:upto])
            self._done = upto

    def digest(self) -> bytes:
        self.close()
        return self._h.digest()

    def close(self) -> None:
        if self._q is not None:
            self._q.put(None)
            self._t.join()
            self._q = None


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
    """Authenticate and decrypt one payload chunk by chunk into one buffer.

    ``read(offset, n)`` supplies ciphertext; at most READ_BATCH bytes of it
    are held at a time. The SHA-256 of the plaintext is checked against the signed
    manifest too: AEAD keys are symmetric, so anyone holding the KEK could
    re-encrypt a chunk, but only the publisher can sign a digest.
    """
    aead = AESGCM(key)
    view = _plain_buffer(size)
    hasher = _Hasher(view, threaded=size >= 2 * _Hasher.BLOCK)
    n = chunk_count(size, chunk_size)
    per_read = max(1, READ_BATCH // (chunk_size + TAG_LEN))  # whole chunks per read
    pos = offset
    try:
        for first in range(0, n, per_read):
            last = min(n, first + per_read)
            want = sum(min(chunk_size, size - i * chunk_size) + TAG_LEN for i in range(first, last))
            batch = memoryview(read(pos, want))
            if len(batch) != want:
                raise TamperError(f"payload {name!r}: ciphertext is truncated", check="truncated")
            pos += want
            boff = 0
            for i in range(first, last):
                start = i * chunk_size
                plen = min(chunk_size, size - start)
                ct = batch[boff:boff + plen + TAG_LEN]
                boff += plen + TAG_LEN
                try:
                    aead.decrypt_into(chunk_nonce(i, i == n - 1), ct, aad, view[start:start + plen])
                except InvalidTag:
                    raise TamperError(
                        f"payload {name!r}: chunk {i} failed authentication", check="chunk-auth"
                    ) from None
                hasher.advance(start + plen, final=i == n - 1)
        if not hmac.compare_digest(hasher.digest(), expected_sha256):
            raise TamperError(f"payload {name!r}: SHA-256 does not match manifest", check="digest")
    except BaseException:
        hasher.close()
        view[:] = bytes(size)  # don't leave unauthenticated plaintext lying around
        view.release()
        raise
    result = bytes(view)  # onnxruntime takes bytes: one copy
    view.release()
    return result
