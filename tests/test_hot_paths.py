"""Fast paths added for the latency budgets compute exactly what the checked paths do.

* ``AnomalyScorer.score``: the stacked-matrix batch-1 path and the vectorised
  fused path equal the detector-by-detector checked path (all detector kinds,
  orthonormal and non-orthonormal PCA, k > 1), and still refuse bad inputs.
* ``SweptMemoryStorage``: no expiry thread per hit, expired entries reclaimed,
  counts exact.
* ``decrypt_payload``: the threaded multi-batch path round-trips and refuses a
  tampered late chunk or a wrong digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import numpy as np
import pytest

from runtime_guard.anomaly import FORMAT, AnomalyInputError, AnomalyScorer
from runtime_guard.bundle.stream import READ_BATCH, decrypt_payload, encrypt_chunks
from runtime_guard.config import RateLimitConfig
from runtime_guard.errors import TamperError
from runtime_guard.ratelimit import RateLimiter, SweptMemoryStorage

D_IN, D_F, C = 20, 12, 5


def _scorer(seed: int, orthonormal: bool = True, k: int = 1, with_msp: bool = True) -> AnomalyScorer:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((D_F, D_F))
    comp = np.linalg.qr(rng.standard_normal((D_IN, 6)))[0].T  # orthonormal rows
    if not orthonormal:
        comp = comp * 1.5
    bank = rng.standard_normal((40, D_F))
    arrays = {
        "maha__means": rng.standard_normal((C, D_F)),
        "maha__precision": a @ a.T + np.eye(D_F),
        "knn__bank": bank / np.linalg.norm(bank, axis=1, keepdims=True),
        "iknn__bank": rng.random((30, D_IN)),
        "pca__mean": rng.random(D_IN),
        "pca__components": comp,
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    norm = {"mean": 0.3, "std": 1.7}
    dets = [
        {"name": "energy", "kind": "energy", "view": "logits", "params": {"temperature": 2.0}, "norm": norm},
        {"name": "maha", "kind": "mahalanobis", "view": "features", "norm": norm},
        {"name": "knn", "kind": "knn", "view": "features", "params": {"n_neighbors": k, "normalize": True}, "norm": norm},
        {"name": "iknn", "kind": "input_knn", "view": "input", "params": {"n_neighbors": k}, "norm": norm},
        {"name": "pca", "kind": "pca", "view": "input", "norm": norm},
    ]
    if with_msp:
        dets.append({"name": "msp", "kind": "msp", "view": "logits", "norm": {"mean": 0.1, "std": 0.2}})
    meta = {
        "format": FORMAT,
        "threshold": 1.0,
        "fusion": {"rule": "mean_z", "members": [d["name"] for d in dets]},
        "detectors": dets,
    }
    return AnomalyScorer.from_bytes(buf.getvalue(), meta)


def _views(seed: int, n: int):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 4, 5)).astype(np.float32)
    return x, rng.standard_normal((n, C)).astype(np.float32) * 3, rng.standard_normal((n, D_F)).astype(np.float32)


@pytest.mark.parametrize("orthonormal,k,with_msp", [(True, 1, True), (False, 1, False), (True, 3, True)])
def test_fused_fast_paths_equal_checked_path(orthonormal, k, with_msp):
    sc = _scorer(0, orthonormal, k, with_msp)
    x, lg, ft = _views(1, 50)
    checked = sc._checked_score(x, lg, ft)
    np.testing.assert_allclose(sc.score(x, lg, ft), checked, rtol=0, atol=1e-10)
    one = np.array([sc.score(x[i : i + 1], lg[i : i + 1], ft[i : i + 1])[0] for i in range(len(x))])
    np.testing.assert_allclose(one, checked, rtol=0, atol=1e-10)
    # the batch-1 path is taken exactly when every fused detector has a batch-1 form
    assert (sc._plan.ones is not None) == (orthonormal and k == 1)


def test_batch_one_path_refuses_bad_inputs():
    sc = _scorer(2)
    x, lg, ft = _views(3, 1)
    bad = ft.copy()
    bad[0, 3] = np.inf
    with pytest.raises(AnomalyInputError, match="NaN"):
        sc.score(x, lg, bad)
    bad_lg = lg.copy()
    bad_lg[0, 0] = -np.inf  # would vanish in a softmax-style sum: must still be refused
    with pytest.raises(AnomalyInputError, match="NaN"):
        sc.score(x, bad_lg, ft)
    with pytest.raises(AnomalyInputError, match="features"):
        sc.score(x, lg, None)
    with pytest.raises(AnomalyInputError, match="expected"):
        sc.score(x, lg, ft[:, :5])
    with pytest.raises(AnomalyInputError, match="samples"):
        sc.score(np.concatenate([x, x]), lg, ft)
    # nested lists still go through the checked path and give the same number
    assert sc.score(x.tolist(), lg.tolist(), ft.tolist())[0] == pytest.approx(sc.score(x, lg, ft)[0], abs=1e-12)


def test_swept_memory_storage_starts_no_threads_and_reclaims():
    lim = RateLimiter(RateLimitConfig(per_client="3/second"), "memory://")
    assert isinstance(lim.storage, SweptMemoryStorage)
    before = threading.active_count()
    allowed = [lim.hit(f"c{i % 2}") is None for i in range(8)]
    assert allowed == [True, True, True, True, True, True, False, False]  # exact per-client count
    assert threading.active_count() <= before  # no expiry Timer per hit
    assert lim.storage.events  # entries are held...
    time.sleep(1.1)
    lim.storage.sweep()
    assert not lim.storage.events and not lim.storage.locks  # ...and reclaimed once expired
    assert lim.hit("c0") is None  # window moved on


def test_threaded_decrypt_roundtrip_and_late_tamper():
    key, aad, chunk = os.urandom(32), b"aad", 64 * 1024
    pt = os.urandom(5 * READ_BATCH + 12345)  # >= 4 batches: hashing runs on the helper thread
    ct = bytearray(b"".join(encrypt_chunks(key, aad, pt, chunk)))
    digest = hashlib.sha256(pt).digest()

    def read(o: int, n: int) -> bytes:
        return bytes(ct[o : o + n])

    out = decrypt_payload(key, aad, read, 0, len(pt), chunk, digest, "m")
    assert type(out) is bytes and out == pt
    with pytest.raises(TamperError, match="SHA-256"):
        decrypt_payload(key, aad, read, 0, len(pt), chunk, hashlib.sha256(b"other").digest(), "m")
    ct[-100] ^= 1  # last chunk
    with pytest.raises(TamperError, match="chunk"):
        decrypt_payload(key, aad, read, 0, len(pt), chunk, digest, "m")
