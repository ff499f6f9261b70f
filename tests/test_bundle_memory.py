"""Loading a large model from a bundle holds one copy of the weights at a time.

``GuardedModel.load`` admits the decrypted model, frees it, and lets onnxruntime read the
model through a pipe fed by a second, digest-checked decryption pass
(``admission.load_session_streamed``, ``OpenedBundle.stream_model``). Checked: the session
answers like a plain one; the second pass writes nothing that differs from what was
admitted, and a bundle swapped in between yields a TamperError, never a session; peak and
resident memory of a 52 MB model in fresh processes stay near a plain
``InferenceSession(path)`` (generous bounds, not timed).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.admission import AdmissionLimits, load_session_streamed
from runtime_guard.bundle import generate_kek, generate_signing_keypair, open_bundle, write_bundle, write_secret_file
from runtime_guard.bundle.stream import READ_BATCH, decrypt_payload, encrypt_chunks, stream_payload
from runtime_guard.errors import TamperError
from runtime_guard.guard import GuardedModel

STREAM = AdmissionLimits(strip_min_model_bytes=0)  # stream even these small models
D = 400  # 400*400*4 B = 640 KiB of weights: several READ_BATCH batches


def mlp(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) / 20, "W")
    h = numpy_helper.from_array(rng.standard_normal((D, 3)).astype(np.float32), "H")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Relu", ["z"], ["r"]),
                           helper.make_node("MatMul", ["r", "H"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, D])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])], [w, h])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


@pytest.fixture
def keys():
    priv, pub = generate_signing_keypair()
    return priv, pub, generate_kek()


def _bundle(path: Path, model: bytes, keys) -> Path:
    priv, _, kek = keys
    write_bundle(path, {"model": model}, {}, priv, kek, 1)
    return path


def test_streamed_session_answers_like_a_plain_one(tmp_path, keys):
    model = mlp()
    x = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    opened = open_bundle(_bundle(tmp_path / "m.ewb", model, keys), keys[1], keys[2])
    sess = load_session_streamed(opened.take_model, opened.stream_model, STREAM)
    assert "model" not in opened.payloads  # the plaintext was handed over, not kept
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], want)


def test_guarded_load_streams_a_model_over_the_limit(tmp_path, keys):
    model = mlp()
    guard = GuardedModel.load(_bundle(tmp_path / "m.ewb", model, keys), keys[1], keys[2],
                              admission_limits=STREAM)
    x = np.random.default_rng(2).standard_normal((1, D)).astype(np.float32)
    want = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(guard.session.run(None, {"x": x})[0], want)


def test_a_bundle_swapped_after_verification_never_becomes_a_session(tmp_path, keys):
    path = _bundle(tmp_path / "m.ewb", mlp(seed=0), keys)
    opened = open_bundle(path, keys[1], keys[2])
    _bundle(path, mlp(seed=1), keys)  # same keys, other weights, written over the verified file
    with pytest.raises(TamperError):
        load_session_streamed(opened.take_model, opened.stream_model, STREAM)


def test_second_pass_writes_only_batches_that_match_the_first():
    plain = np.random.default_rng(3).bytes(3 * READ_BATCH + 1000)
    key, aad, cs = bytes(32), b"aad", 64 * 1024
    blob = b"".join(encrypt_chunks(key, aad, plain, cs))
    sha = hashlib.sha256(plain).digest()
    digests: list[bytes] = []
    read = lambda off, n: blob[off:off + n]  # noqa: E731
    assert decrypt_payload(key, aad, read, 0, len(plain), cs, sha, "model", batch_digests=digests) == plain
    assert len(digests) == 4

    def readinto(off: int, view: memoryview) -> int:
        got = blob[off:off + len(view)]
        view[:len(got)] = got
        return len(got)

    out = bytearray()
    stream_payload(key, aad, readinto, 0, len(plain), cs, sha, digests, "model", out.extend)
    assert bytes(out) == plain
    forged = list(digests)
    forged[2] = bytes(32)  # as if batch 2 had changed since the first pass
    out.clear()
    with pytest.raises(TamperError) as e:
        stream_payload(key, aad, readinto, 0, len(plain), cs, sha, forged, "model", out.extend)
    assert e.value.check == "digest" and len(out) < len(plain) and plain.startswith(bytes(out))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_bundle_memory", Path(__file__).resolve().parent.parent / "benchmarks" / "bench_bundle_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_guarded_load_keeps_no_second_copy_of_a_52mb_model(tmp_path):
    """Fresh processes, side by side: before this change the loader peaked at 2.4x a plain
    load and kept the plaintext resident next to onnxruntime's copy."""
    bench = _bench()
    size = bench.make_model(tmp_path / "big.onnx", width=1800, layers=4)  # 4 x 13 MB
    priv, pub = generate_signing_keypair()
    write_secret_file(tmp_path / "signing.pem", priv)
    (tmp_path / "signing.pub.pem").write_bytes(pub)
    write_secret_file(tmp_path / "kek.key", generate_kek())
    bench.run_child("write_bundle", tmp_path)
    plain = bench.run_child("plain_path", tmp_path)
    guarded = bench.run_child("guarded_load", tmp_path)
    mb = size / 2**20
    assert guarded["peak_added_mb"] <= 1.5 * plain["peak_added_mb"] + 10, (plain, guarded)
    assert guarded["resident_after_mb"] <= plain["resident_after_mb"] + 0.3 * mb + 10, (plain, guarded)
