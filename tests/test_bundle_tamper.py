"""Every tampering of a bundle is refused with the exact exception subtype,
and no plaintext ever reaches the filesystem."""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.bundle import (
    RollbackState,
    build_bundle,
    generate_kek,
    generate_signing_keypair,
    open_bundle,
)
from runtime_guard.bundle.format import (
    KEK_BLOCK_LEN,
    MANIFEST_OFFSET,
    MAX_MANIFEST_LEN,
    PREFIX_LEN,
    SIGNATURE_LEN,
    TAG_LEN,
)
from runtime_guard.bundle.stream import decrypt_payload, encrypt_chunks
from runtime_guard.errors import (
    BundleKeyError,
    ExpiredError,
    FormatError,
    RollbackError,
    SignatureError,
    TamperError,
)

CHUNK = 4096  # small chunks so one ~20 KB model spans several
NOW = 1_800_000_000


def make_model() -> bytes:
    rng = np.random.default_rng(42)
    w = numpy_helper.from_array(rng.standard_normal((4, 1200)).astype(np.float32), "W")  # ~19 KB
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1200])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


MODEL = make_model()
DETECTORS = np.random.default_rng(7).bytes(9000)  # two payloads of different sizes
PAYLOADS = {"model": MODEL, "detectors.npz": DETECTORS}
SENTINELS = [MODEL[len(MODEL) // 2:len(MODEL) // 2 + 48], DETECTORS[100:148]]


@pytest.fixture(scope="module")
def ctx():
    priv, pub = generate_signing_keypair()
    kek = generate_kek()
    a, man = build_bundle(PAYLOADS, {"runtime": {"t": 1}}, priv, kek, 10, 3600, now=NOW, chunk_size=CHUNK)
    b, _ = build_bundle(PAYLOADS, {"runtime": {"t": 1}}, priv, kek, 10, 3600, now=NOW, chunk_size=CHUNK)
    return {"priv": priv, "pub": pub, "kek": kek, "a": a, "b": b, "manifest": man}


# --- plaintext-leak guard -------------------------------------------------

def _snapshot(roots):
    out = {}
    for root in roots:
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in (".venv", ".git", "__pycache__", ".pytest_cache")]
            for f in files:
                p = os.path.join(d, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def no_plaintext_on_disk(tmp_path):
    roots = [os.getcwd(), tempfile.gettempdir(), str(tmp_path)]
    before = _snapshot(roots)
    yield
    after = _snapshot(roots)
    for p, sig in after.items():
        if before.get(p) == sig or sig[0] > 64 * 1024 * 1024:
            continue
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            continue
        for s in SENTINELS:
            assert s not in data, f"plaintext found in new/changed file {p}"


# --- helpers ---------------------------------------------------------------

def layout(blob: bytes):
    mlen = int.from_bytes(blob[MANIFEST_OFFSET - 4:MANIFEST_OFFSET], "big")
    sig = MANIFEST_OFFSET + mlen
    return mlen, sig, sig + SIGNATURE_LEN


def chunk_spans(blob: bytes, manifest) -> dict[str, list[tuple[int, int]]]:
    _, _, off = layout(blob)
    spans = {}
    for p in manifest["payloads"]:
        n = max(1, -(-p["size"] // CHUNK))
        lst = []
        for i in range(n):
            clen = min(CHUNK, p["size"] - i * CHUNK) + TAG_LEN
            lst.append((off, off + clen))
            off += clen
        spans[p["name"]] = lst
    assert off == len(blob)
    return spans


def expected_for_flip(blob: bytes, pos: int, new_byte: int):
    """Which subtype a flipped byte at ``pos`` must raise."""
    mlen, sig, payload = layout(blob)
    if pos < PREFIX_LEN:
        return FormatError  # magic / version / reserved flags
    if pos < PREFIX_LEN + KEK_BLOCK_LEN:
        return SignatureError
    if pos < MANIFEST_OFFSET:  # manifest length field
        b = bytearray(blob[MANIFEST_OFFSET - 4:MANIFEST_OFFSET])
        b[pos - (MANIFEST_OFFSET - 4)] = new_byte
        new = int.from_bytes(b, "big")
        if new == 0 or new > MAX_MANIFEST_LEN or MANIFEST_OFFSET + new + SIGNATURE_LEN > len(blob):
            return FormatError
        return SignatureError
    if pos < payload:
        return SignatureError  # manifest or signature bytes
    return TamperError


def assert_rejected(data, ctx, exc, **kw):
    with pytest.raises(exc) as ei:
        open_bundle(data, ctx["pub"], ctx["kek"], now=NOW, **kw)
    assert type(ei.value) is exc, f"expected {exc.__name__}, got {type(ei.value).__name__}: {ei.value}"


# --- tests -----------------------------------------------------------------

def test_baseline_opens(ctx):
    assert open_bundle(ctx["a"], ctx["pub"], ctx["kek"], now=NOW).payloads == PAYLOADS
    spans = chunk_spans(ctx["a"], ctx["manifest"])
    assert len(spans["model"]) >= 5 and len(spans["detectors.npz"]) >= 3


def test_bit_flips_everywhere(ctx):
    blob = ctx["a"]
    mlen, sig, payload = layout(blob)
    positions = set(range(MANIFEST_OFFSET))                     # every header byte
    positions |= set(range(MANIFEST_OFFSET, sig, 7)) | {sig - 1}  # manifest sample
    positions |= set(range(sig, payload))                       # every signature byte
    for spans in chunk_spans(blob, ctx["manifest"]).values():  # every chunk: body + tag
        for s, e in spans:
            positions |= {s, s + 1, (s + e) // 2, e - TAG_LEN - 1, e - TAG_LEN, e - 1}
            positions |= set(range(s, e, 997))
    assert len(positions) > 300
    masks = (0x01, 0x80, 0xFF, 0x10)
    for i, pos in enumerate(sorted(positions)):
        bad = bytearray(blob)
        bad[pos] ^= masks[i % len(masks)]
        assert_rejected(bytes(bad), ctx, expected_for_flip(blob, pos, bad[pos]))


def test_truncation_at_many_lengths(ctx):
    blob = ctx["a"]
    _, _, payload = layout(blob)
    lengths = set(range(0, len(blob), 97)) | set(range(payload - 70, payload + 70))
    for spans in chunk_spans(blob, ctx["manifest"]).values():
        for s, e in spans:
            lengths |= {s, e - 1, e - TAG_LEN, e}
    lengths.discard(len(blob))
    assert len(lengths) > 200
    for n in sorted(lengths):
        assert_rejected(blob[:n], ctx, FormatError if n < payload else TamperError)


def test_appended_bytes(ctx):
    blob = ctx["a"]
    for extra in (b"\x00", os.urandom(TAG_LEN), os.urandom(CHUNK + TAG_LEN), blob[-100:]):
        assert_rejected(blob + extra, ctx, TamperError)


def test_chunk_reorder_duplicate_and_cross_bundle_swap(ctx):
    a, b = ctx["a"], ctx["b"]
    sa = chunk_spans(a, ctx["manifest"])["model"]
    sb = chunk_spans(b, ctx["manifest"])["model"]
    assert sa == sb  # same layout, different keys/salt

    def put(dst, span, src_bytes):
        s, e = span
        assert e - s == len(src_bytes)
        return dst[:s] + src_bytes + dst[e:]

    # swap chunks 0 and 1 within a bundle
    c0, c1 = a[sa[0][0]:sa[0][1]], a[sa[1][0]:sa[1][1]]
    assert_rejected(put(put(a, sa[0], c1), sa[1], c0), ctx, TamperError)
    # replay chunk 0 in place of chunk 1
    assert_rejected(put(a, sa[1], c0), ctx, TamperError)
    # same-index chunk from another bundle made with the same keys
    for i in range(len(sa) - 1):
        assert_rejected(put(a, sa[i], b[sb[i][0]:sb[i][1]]), ctx, TamperError)
    # whole payload region (all chunks) from bundle b
    _, _, pa = layout(a)
    _, _, pb = layout(b)
    assert_rejected(a[:pa] + b[pb:], ctx, TamperError)


def test_swap_payload_sections_of_equal_size(ctx):
    same = os.urandom(6000)
    blob, man = build_bundle({"a.bin": same, "b.bin": os.urandom(6000), "model": MODEL}, {},
                             ctx["priv"], ctx["kek"], 1, chunk_size=CHUNK)
    spans = chunk_spans(blob, man)
    (a0, a1), (b0, b1) = (spans["a.bin"][0][0], spans["a.bin"][-1][1]), (spans["b.bin"][0][0], spans["b.bin"][-1][1])
    assert a1 - a0 == b1 - b0 and a1 == b0
    swapped = blob[:a0] + blob[b0:b1] + blob[a0:a1] + blob[b1:]
    assert_rejected(swapped, ctx, TamperError)


def test_header_from_another_bundle(ctx):
    """Bundle b's signed head on a's payloads: AAD binds manifest digest."""
    a, b = ctx["a"], ctx["b"]
    _, _, pa = layout(a)
    _, _, pb = layout(b)
    assert_rejected(b[:pb] + a[pa:], ctx, TamperError)


def test_wrong_keys(ctx):
    with pytest.raises(BundleKeyError) as ei:
        open_bundle(ctx["a"], ctx["pub"], generate_kek(), now=NOW)
    assert type(ei.value) is BundleKeyError
    with pytest.raises(SignatureError) as ei:
        open_bundle(ctx["a"], generate_signing_keypair()[1], ctx["kek"], now=NOW)
    assert type(ei.value) is SignatureError


def test_signature_checked_before_key_unwrap(ctx):
    bad = bytearray(ctx["a"])
    bad[MANIFEST_OFFSET + 3] ^= 1
    with pytest.raises(SignatureError):  # not BundleKeyError, though the KEK is wrong too
        open_bundle(bytes(bad), ctx["pub"], generate_kek(), now=NOW)


def test_unsigned_or_resigned(ctx):
    blob = ctx["a"]
    _, sig, payload = layout(blob)
    assert_rejected(blob[:sig] + bytes(SIGNATURE_LEN) + blob[payload:], ctx, SignatureError)  # zeroed
    assert_rejected(blob[:sig] + blob[payload:], ctx, SignatureError)  # removed
    # re-signed by an attacker key over the same content
    attacker, _ = generate_signing_keypair()
    other, _ = build_bundle(PAYLOADS, {}, attacker, ctx["kek"], 10, chunk_size=CHUNK)
    assert_rejected(other, ctx, SignatureError)


def test_expired_and_rolled_back(ctx, tmp_path):
    with pytest.raises(ExpiredError) as ei:
        open_bundle(ctx["a"], ctx["pub"], ctx["kek"], now=NOW + 3600)
    assert type(ei.value) is ExpiredError
    state = RollbackState(tmp_path / "rb.json")
    newer, _ = build_bundle(PAYLOADS, {}, ctx["priv"], ctx["kek"], 11, chunk_size=CHUNK)
    open_bundle(newer, ctx["pub"], ctx["kek"], rollback_state=state).accept()
    assert_rejected(ctx["a"], ctx, RollbackError, rollback_state=state)
    assert state.highest_version == 11


def test_failed_open_does_not_advance_rollback(ctx, tmp_path):
    state = RollbackState(tmp_path / "rb.json")
    newer, _ = build_bundle(PAYLOADS, {}, ctx["priv"], ctx["kek"], 12, chunk_size=CHUNK)
    bad = bytearray(newer)
    bad[-1] ^= 1
    with pytest.raises(TamperError):
        open_bundle(bytes(bad), ctx["pub"], ctx["kek"], rollback_state=state)
    assert state.highest_version is None


def test_tampered_file_on_disk(ctx, tmp_path):
    p = tmp_path / "x.ewb"
    bad = bytearray(ctx["a"])
    bad[-3] ^= 0x40
    p.write_bytes(bytes(bad))
    with pytest.raises(TamperError):
        open_bundle(p, ctx["pub"], ctx["kek"], now=NOW)


def test_stream_detects_truncation_at_chunk_boundary():
    """Below the length check: the last-chunk flag alone catches dropped chunks."""
    key, aad, pt = os.urandom(32), b"aad", os.urandom(5 * 256)
    ct = b"".join(encrypt_chunks(key, aad, pt, 256))
    read = lambda o, n: ct[o:o + n]  # noqa: E731
    ok = decrypt_payload(key, aad, read, 0, len(pt), 256, hashlib.sha256(pt).digest(), "p")
    assert ok == pt
    short = pt[:4 * 256]
    with pytest.raises(TamperError):  # chunk 3 was sealed as non-final
        decrypt_payload(key, aad, read, 0, len(short), 256, hashlib.sha256(short).digest(), "p")
    with pytest.raises(TamperError):  # wrong AAD (other bundle / payload name)
        decrypt_payload(key, b"other", read, 0, len(pt), 256, hashlib.sha256(pt).digest(), "p")


def test_kek_holder_cannot_swap_payload(ctx):
    """AEAD is symmetric: a device owner with the KEK can re-seal chunks that
    authenticate. The signed SHA-256 in the manifest still refuses them."""
    from runtime_guard.bundle.format import PREFIX_LEN as P
    from runtime_guard.bundle.keys import unwrap_data_key
    from runtime_guard.bundle.manifest import manifest_digest
    from runtime_guard.bundle.stream import derive_payload_key, payload_aad

    blob, man = ctx["a"], ctx["manifest"]
    mlen, sig, _ = layout(blob)
    data_key = unwrap_data_key(ctx["kek"], blob[P:P + KEK_BLOCK_LEN], blob[:P])
    digest = manifest_digest(blob[MANIFEST_OFFSET:sig])
    evil = bytearray(MODEL)
    evil[-10] ^= 1  # same size, different model
    key = derive_payload_key(data_key, bytes.fromhex(man["crypto"]["salt"]), "model")
    sealed = b"".join(encrypt_chunks(key, payload_aad(digest, "model"), bytes(evil), CHUNK))
    spans = chunk_spans(blob, man)["model"]
    forged = blob[:spans[0][0]] + sealed + blob[spans[-1][1]:]
    assert len(forged) == len(blob)
    with pytest.raises(TamperError, match="SHA-256"):
        open_bundle(forged, ctx["pub"], ctx["kek"], now=NOW)


def test_large_payload_paths(ctx):
    """>= 8 MiB payloads use the zero-copy output buffer and the hashing thread."""
    from runtime_guard.bundle.format import PREFIX_LEN as P
    from runtime_guard.bundle.keys import unwrap_data_key
    from runtime_guard.bundle.manifest import manifest_digest
    from runtime_guard.bundle.stream import derive_payload_key, payload_aad

    big = np.random.default_rng(9).bytes(9 * 1024 * 1024 + 123)
    blob, man = build_bundle({"model": MODEL, "weights.bin": big}, {}, ctx["priv"], ctx["kek"], 1)
    opened = open_bundle(blob, ctx["pub"], ctx["kek"])
    assert opened.payloads["weights.bin"] == big and type(opened.payloads["weights.bin"]) is bytes

    bad = bytearray(blob)
    bad[len(blob) - 70_000] ^= 2
    with pytest.raises(TamperError, match="authentication"):
        open_bundle(bytes(bad), ctx["pub"], ctx["kek"])

    # KEK holder re-seals a modified copy: AEAD passes, signed digest does not
    _, sig, _ = layout(blob)
    data_key = unwrap_data_key(ctx["kek"], blob[P:P + KEK_BLOCK_LEN], blob[:P])
    digest = manifest_digest(blob[MANIFEST_OFFSET:sig])
    evil = bytearray(big)
    evil[5_000_000] ^= 1
    chunk = man["crypto"]["chunk_size"]
    key = derive_payload_key(data_key, bytes.fromhex(man["crypto"]["salt"]), "weights.bin")
    sealed = b"".join(encrypt_chunks(key, payload_aad(digest, "weights.bin"), bytes(evil), chunk))
    forged = blob[:len(blob) - len(sealed)] + sealed  # weights.bin is the last payload
    with pytest.raises(TamperError, match="SHA-256"):
        open_bundle(forged, ctx["pub"], ctx["kek"])
