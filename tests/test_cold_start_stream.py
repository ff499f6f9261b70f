"""Single-buffer decryption (runtime_guard.bundle.stream.decrypt_payload):
ciphertext is read straight into the output buffer, decrypted chunk by chunk
through a small slot, compacted, hashed (on helper threads for large payloads).
Round trips at every size boundary, refuses every tamper case with the same
errors, zeroes plaintext on failure and leaves no threads behind."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from runtime_guard.bundle import build_bundle, generate_kek, generate_signing_keypair, open_bundle
from runtime_guard.bundle.stream import (
    READ_BATCH,
    THREADED_MIN_BATCHES,
    decrypt_payload,
    encrypt_chunks,
)
from runtime_guard.errors import FormatError, TamperError

KEY, AAD = bytes(range(32)), b"aad"


def sealed(pt: bytes, chunk: int) -> bytes:
    return b"".join(encrypt_chunks(KEY, AAD, pt, chunk))


def readinto_of(ct: bytes, keep: list | None = None):
    def readinto(off: int, view: memoryview) -> int:
        got = max(0, min(len(view), len(ct) - off))
        view[:got] = ct[off:off + got]
        if keep is not None:
            keep.append((off, view))
        return got
    return readinto


def dec(pt: bytes, ct: bytes, chunk: int, digest: bytes | None = None, **kw) -> bytes:
    digest = hashlib.sha256(pt).digest() if digest is None else digest
    return decrypt_payload(KEY, AAD, None, 0, len(pt), chunk, digest, "p",
                           readinto=kw.pop("readinto", None) or readinto_of(ct), **kw)


@pytest.mark.parametrize("size,chunk", [
    (0, 64), (1, 64), (63, 64), (64, 64), (65, 64), (1000, 64),
    (READ_BATCH - 1, 64 * 1024), (READ_BATCH + 1, 64 * 1024),
    (2 * READ_BATCH + 7, 64 * 1024),  # several batches, unthreaded
    (THREADED_MIN_BATCHES * READ_BATCH + 12345, 64 * 1024),  # threaded
    (THREADED_MIN_BATCHES * READ_BATCH + 3, 1000),  # odd chunk size, threaded
    (3 * READ_BATCH + 5, 2 * READ_BATCH),  # chunks bigger than a read batch
])
def test_roundtrip_sizes(size, chunk):
    pt = os.urandom(size)
    before = threading.active_count()
    out = dec(pt, sealed(pt, chunk), chunk)
    assert type(out) is bytes and out == pt
    assert threading.active_count() == before
    # the legacy read(offset, n) interface gives the same result
    ct = sealed(pt, chunk)
    out2 = decrypt_payload(KEY, AAD, lambda o, n: ct[o:o + n], 0, size, chunk,
                           hashlib.sha256(pt).digest(), "p")
    assert out2 == pt


@pytest.mark.parametrize("where", ["first", "middle", "last", "tag"])
def test_threaded_tamper_any_chunk(where):
    chunk = 64 * 1024
    pt = os.urandom(THREADED_MIN_BATCHES * READ_BATCH + 777)
    ct = bytearray(sealed(pt, chunk))
    pos = {"first": 5, "middle": len(ct) // 2, "last": len(ct) - 40, "tag": len(ct) - 1}[where]
    ct[pos] ^= 0x01
    before = threading.active_count()
    with pytest.raises(TamperError) as ei:
        dec(pt, bytes(ct), chunk)
    assert ei.value.check == "chunk-auth"
    assert threading.active_count() == before


@pytest.mark.parametrize("size", [5000, THREADED_MIN_BATCHES * READ_BATCH + 99])
def test_short_source_is_truncation(size):
    chunk = 64 * 1024 if size > 10000 else 256
    pt = os.urandom(size)
    ct = sealed(pt, chunk)
    with pytest.raises(TamperError) as ei:
        dec(pt, ct[:-100], chunk)
    assert ei.value.check == "truncated"


def test_reader_errors_propagate_unchanged():
    chunk = 64 * 1024
    pt = os.urandom(THREADED_MIN_BATCHES * READ_BATCH + 1)
    ct = sealed(pt, chunk)
    inner = readinto_of(ct)
    calls = []

    def failing(off: int, view: memoryview) -> int:
        calls.append(off)
        if len(calls) == 3:
            raise FormatError("cannot read bundle: I/O error", check="io")
        return inner(off, view)

    before = threading.active_count()
    with pytest.raises(FormatError) as ei:
        dec(pt, ct, chunk, readinto=failing)
    assert ei.value.check == "io"
    assert threading.active_count() == before


@pytest.mark.parametrize("size", [3000, THREADED_MIN_BATCHES * READ_BATCH + 5])
def test_plaintext_zeroed_on_digest_mismatch(size):
    """Every chunk authenticates (a KEK holder's re-encryption), the signed
    digest does not match: the decrypted bytes must not survive in the buffer."""
    chunk = 64 * 1024 if size > 10000 else 256
    pt = os.urandom(size)
    ct = sealed(pt, chunk)
    views: list = []
    with pytest.raises(TamperError) as ei:
        dec(pt, ct, chunk, digest=hashlib.sha256(b"other").digest(), readinto=readinto_of(ct, views))
    assert ei.value.check == "digest"
    buf = bytearray(len(ct))
    for off, v in views:  # the views cover the whole output buffer
        buf[off:off + len(v)] = v
    assert buf[:size] == bytes(size)


def test_plaintext_zeroed_on_late_chunk_failure():
    chunk = 256
    pt = os.urandom(40 * chunk)
    ct = bytearray(sealed(pt, chunk))
    ct[-20] ^= 1
    views: list = []
    with pytest.raises(TamperError):
        dec(pt, bytes(ct), chunk, readinto=readinto_of(bytes(ct), views))
    buf = bytearray(len(ct))
    for off, v in views:
        buf[off:off + len(v)] = v
    assert pt[:chunk] not in bytes(buf)
    assert buf[:39 * chunk] == bytes(39 * chunk)


@pytest.mark.parametrize("source", ["bytes", "file"])
def test_open_bundle_large_payload_both_sources(tmp_path, source):
    priv, pub = generate_signing_keypair()
    kek = generate_kek()
    model = os.urandom(THREADED_MIN_BATCHES * READ_BATCH + 4321)
    extra = os.urandom(1000)
    blob, _ = build_bundle({"model": model, "extra.bin": extra}, {}, priv, kek, 1)
    src = blob
    if source == "file":
        src = tmp_path / "b.ewb"
        src.write_bytes(blob)
    opened = open_bundle(src, pub, kek)
    assert opened.payloads["model"] == model and opened.payloads["extra.bin"] == extra
    bad = bytearray(blob)
    bad[len(blob) - 500] ^= 1  # payloads are stored in name order: "model" is last
    with pytest.raises(TamperError):
        open_bundle(bytes(bad), pub, kek)
