"""Round-trip, key handling, rollback state and inspect for model bundles."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.bundle import (
    Kek,
    RollbackState,
    build_bundle,
    generate_kek,
    generate_signing_keypair,
    inspect_bundle,
    load_kek,
    load_private_key,
    load_public_key,
    open_bundle,
    verify_bundle,
    write_bundle,
    write_secret_file,
)
from runtime_guard.bundle.format import MAGIC, MANIFEST_OFFSET
from runtime_guard.bundle.manifest import canonical_json, parse_manifest
from runtime_guard.errors import (
    BundleError,
    BundleKeyError,
    ExpiredError,
    FormatError,
    RollbackError,
)

NOW = 1_800_000_000


def make_classifier(hidden: int = 64, seed: int = 0) -> bytes:
    """Gemm -> Relu -> Gemm -> Softmax, input [None, 4], 3 classes."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((hidden,)).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal((3,)).astype(np.float32), "B2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2", "B2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


FIELDS = {
    "model": {"name": "clf", "input_name": "x", "input_shape": [None, 4],
              "input_dtype": "float32", "output_names": ["probs"]},
    "runtime": {"rate_limit": {"per_minute": 60}, "gate": {"threshold": 0.25},
                "smoke": {"inputs": [[0.1, 0.2, 0.3, 0.4]]}},
    "report_digest": "sha256:" + "ab" * 32,
    "forced": False,
}


@pytest.fixture(scope="module")
def keys():
    priv, pub = generate_signing_keypair()
    return priv, pub, generate_kek()


@pytest.fixture(scope="module")
def model_bytes():
    return make_classifier()


def test_roundtrip_bit_identical_inference(tmp_path, keys, model_bytes):
    priv, pub, kek = keys
    extra = os.urandom(3000)
    out = tmp_path / "m.ewb"
    manifest = write_bundle(out, {"model": model_bytes, "detectors.npz": extra}, FIELDS,
                            priv, kek, version=7, expires_in_s=3600, now=NOW, chunk_size=1024)
    assert manifest["version"] == 7 and manifest["expires_at"] == NOW + 3600
    assert manifest["runtime"] == FIELDS["runtime"]
    assert model_bytes not in out.read_bytes()  # ciphertext on disk only

    opened = open_bundle(out, pub, kek, now=NOW + 1)
    assert opened.payloads == {"model": model_bytes, "detectors.npz": extra}
    assert opened.manifest == manifest
    # bytes input path gives the same result as a path
    assert open_bundle(out.read_bytes(), pub, kek, now=NOW).payloads["model"] == model_bytes

    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    ref = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = opened.open_session().run(None, {"x": x})[0]
    assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes()


def test_manifest_is_canonical_and_signed_fields_present(keys, model_bytes):
    priv, _, kek = keys
    blob, manifest = build_bundle({"model": model_bytes}, FIELDS, priv, kek, 1, now=NOW)
    assert blob.startswith(MAGIC)
    mlen = int.from_bytes(blob[MANIFEST_OFFSET - 4:MANIFEST_OFFSET], "big")
    raw = blob[MANIFEST_OFFSET:MANIFEST_OFFSET + mlen]
    assert raw == canonical_json(manifest)
    assert b" " not in raw.replace(b'"sha256:', b"")  # compact separators
    assert parse_manifest(raw) == manifest
    entry = manifest["payloads"][0]
    assert entry["name"] == "model" and len(entry["sha256"]) == 64
    assert manifest["report_digest"] == FIELDS["report_digest"] and manifest["forced"] is False
    assert manifest["expires_at"] is None


def test_parse_manifest_rejects_non_canonical_and_duplicates():
    good = {"a": 1}
    with pytest.raises(FormatError):
        parse_manifest(b'{"a": 1}')
    with pytest.raises(FormatError):
        parse_manifest(b'{"a":1,"a":2}')
    with pytest.raises(FormatError):
        parse_manifest(b'{"a":NaN}')
    with pytest.raises(FormatError):  # canonical but missing required fields
        parse_manifest(canonical_json(good))


def test_reserved_manifest_fields_rejected(keys, model_bytes):
    priv, _, kek = keys
    with pytest.raises(ValueError):
        build_bundle({"model": model_bytes}, {"version": 99}, priv, kek, 1)
    with pytest.raises(ValueError):
        build_bundle({"model": model_bytes}, {"forced": "yes"}, priv, kek, 1)
    with pytest.raises(ValueError):
        build_bundle({"../evil": b"x"}, {}, priv, kek, 1)


def test_empty_payload_and_exact_chunk_multiple(keys):
    priv, pub, kek = keys
    payloads = {"empty": b"", "exact": os.urandom(2048), "model": b"m" * 1025}
    blob, _ = build_bundle(payloads, {}, priv, kek, 1, chunk_size=1024)
    assert open_bundle(blob, pub, kek).payloads == payloads


def test_verify_bundle_admits_and_does_not_commit(tmp_path, keys, model_bytes):
    priv, pub, kek = keys
    blob, _ = build_bundle({"model": model_bytes}, FIELDS, priv, kek, 5, now=NOW)
    state = RollbackState(tmp_path / "rb.json")
    summary = verify_bundle(blob, pub, kek, rollback_state=state, now=NOW)
    assert summary["ok"] and summary["model_admitted"] and summary["version"] == 5
    assert summary["payloads"] == {"model": len(model_bytes)}
    assert state.highest_version is None  # verify never commits


def test_rollback_accept_flow(tmp_path, keys, model_bytes):
    priv, pub, kek = keys
    state_path = tmp_path / "state" / "rb.json"
    state_path.parent.mkdir()
    b5, _ = build_bundle({"model": model_bytes}, {}, priv, kek, 5)
    b4, _ = build_bundle({"model": model_bytes}, {}, priv, kek, 4)
    b5_other, _ = build_bundle({"model": model_bytes}, {"runtime": {"x": 1}}, priv, kek, 5)
    b6, _ = build_bundle({"model": model_bytes}, {}, priv, kek, 6)

    opened = open_bundle(b5, pub, kek, rollback_state=state_path)
    assert not state_path.exists()  # only accept() writes
    opened.accept()
    st = json.loads(state_path.read_text())
    assert st["version"] == 5 and st["manifest_sha256"] == opened.manifest_sha256
    assert sorted(os.listdir(state_path.parent)) == ["rb.json", "rb.json.lock"]  # no temp file left

    open_bundle(b5, pub, kek, rollback_state=state_path).accept()  # same bundle: fine
    with pytest.raises(RollbackError):
        open_bundle(b4, pub, kek, rollback_state=state_path)
    with pytest.raises(RollbackError):  # different bundle re-using version 5
        open_bundle(b5_other, pub, kek, rollback_state=state_path)
    open_bundle(b6, pub, kek, rollback_state=state_path).accept()
    assert RollbackState(state_path).highest_version == 6
    with pytest.raises(RollbackError):
        open_bundle(b5, pub, kek, rollback_state=state_path)


def test_corrupt_rollback_state_fails_closed(tmp_path, keys, model_bytes):
    priv, pub, kek = keys
    p = tmp_path / "rb.json"
    p.write_text("{not json")
    blob, _ = build_bundle({"model": model_bytes}, {}, priv, kek, 1)
    with pytest.raises(RollbackError):
        open_bundle(blob, pub, kek, rollback_state=p)


def test_bundle_path_must_be_regular_file(tmp_path, keys):
    _, pub, kek = keys
    with pytest.raises(FormatError):
        open_bundle(tmp_path, pub, kek)
    with pytest.raises(FormatError):
        open_bundle(tmp_path / "missing.ewb", pub, kek)


def test_expiry(keys, model_bytes):
    priv, pub, kek = keys
    blob, _ = build_bundle({"model": model_bytes}, {}, priv, kek, 1, expires_in_s=60, now=NOW)
    open_bundle(blob, pub, kek, now=NOW + 59)
    for t in (NOW + 60, NOW + 10**6):
        with pytest.raises(ExpiredError):
            open_bundle(blob, pub, kek, now=t)


def test_key_files_and_permissions(tmp_path, keys, model_bytes, monkeypatch):
    priv_pem, pub_pem, kek = keys
    kp, pp, kf = tmp_path / "sign.pem", tmp_path / "sign.pub", tmp_path / "kek.bin"
    write_secret_file(kp, priv_pem)
    pp.write_bytes(pub_pem)
    write_secret_file(kf, kek)
    assert stat.S_IMODE(os.stat(kp).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kf).st_mode) == 0o600
    with pytest.raises(FileExistsError):  # O_EXCL: never overwrite a key
        write_secret_file(kf, b"x" * 32)

    signer, pub = load_private_key(kp), load_public_key(pp)
    k = load_kek(file=kf)
    assert k == Kek("raw", kek)
    blob, _ = build_bundle({"model": model_bytes}, {}, signer, k, 1)
    assert open_bundle(blob, pub, k).payloads["model"] == model_bytes
    assert open_bundle(blob, pp, kek).payloads["model"] == model_bytes  # path + raw bytes

    monkeypatch.setenv("EW_TEST_KEK", kek.hex())
    assert load_kek(env="EW_TEST_KEK") == k

    for path in (kp, kf):
        for mode in (0o640, 0o604, 0o644, 0o660):
            os.chmod(path, mode)
            with pytest.raises(BundleKeyError, match="permissions"):
                load_private_key(path) if path == kp else load_kek(file=path)
        os.chmod(path, 0o600)
    link = tmp_path / "link.bin"
    link.symlink_to(kf)
    with pytest.raises(BundleKeyError):
        load_kek(file=link)
    with pytest.raises(BundleKeyError):
        load_kek(file=tmp_path / "missing")
    with pytest.raises(BundleKeyError):
        load_kek()
    bad = tmp_path / "short.bin"
    write_secret_file(bad, b"too short")
    with pytest.raises(BundleKeyError):
        load_kek(file=bad)
    monkeypatch.delenv("EW_TEST_KEK")
    with pytest.raises(BundleKeyError):
        load_kek(env="EW_TEST_KEK")


def test_encrypted_private_key(tmp_path):
    priv, _ = generate_signing_keypair(password=b"hunter2")
    p = tmp_path / "k.pem"
    write_secret_file(p, priv)
    load_private_key(p, password=b"hunter2")
    with pytest.raises(BundleKeyError):
        load_private_key(p, password=b"wrong")


def test_passphrase_kek_roundtrip_and_wrong_passphrase(keys, model_bytes):
    priv, pub, _ = keys
    blob, _ = build_bundle({"model": model_bytes}, {}, priv, load_kek(passphrase="correct horse"), 1)
    info = inspect_bundle(blob)
    assert info["kek"] == {"kind": "scrypt", "scrypt_log2n": 15, "scrypt_r": 8, "scrypt_p": 1}
    assert open_bundle(blob, pub, Kek("passphrase", b"correct horse")).payloads["model"] == model_bytes
    with pytest.raises(BundleKeyError):
        open_bundle(blob, pub, Kek("passphrase", b"wrong horse"))
    with pytest.raises(BundleKeyError):  # raw key offered for a passphrase bundle
        open_bundle(blob, pub, generate_kek())


def test_inspect_without_keys(keys, model_bytes):
    priv, pub, kek = keys
    blob, manifest = build_bundle({"model": model_bytes}, FIELDS, priv, kek, 3, now=NOW)
    info = inspect_bundle(blob)
    assert info["manifest"] == manifest and info["signature_verified"] is None
    assert info["file_size"] == info["expected_size"] == len(blob)
    assert info["kek"] == {"kind": "raw"}
    assert inspect_bundle(blob, pub)["signature_verified"] is True
    assert inspect_bundle(blob, generate_signing_keypair()[1])["signature_verified"] is False


def test_error_messages_leak_no_secrets(keys, model_bytes):
    priv, pub, kek = keys
    blob, _ = build_bundle({"model": model_bytes}, {}, priv, kek, 1, chunk_size=256)
    bad = bytearray(blob)
    bad[-5] ^= 1
    wrong = generate_kek()
    for data, k in ((bytes(bad), kek), (blob, wrong)):
        with pytest.raises(BundleError) as ei:
            open_bundle(data, pub, k)
        msg = str(ei.value)
        for secret in (kek, wrong, kek.hex(), wrong.hex(), model_bytes[:32]):
            assert (secret if isinstance(secret, str) else secret.hex()) not in msg
