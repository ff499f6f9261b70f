"""Fast paths added for the latency budgets compute exactly what the checked paths do.

* ``AnomalyScorer.score``: the stacked-matrix batch-1 path and the vectorised
  fused path equal the detector-by-detector checked path (all detector kinds,
  orthonormal and non-orthonormal PCA, k > 1), and still refuse bad inputs.
* ``SweptMemoryStorage``: no expiry thread per hit, expired entries reclaimed,
  counts and window stats equal to limits' own ``MemoryStorage``.
* ``decrypt_payload``: the threaded multi-batch path round-trips and refuses a
  tampered late chunk or a wrong digest.
* One-row Python-float paths (``softmax``, the sanitizer's value checks, the
  guard's finite check / argmax / gate verdict) agree with the numpy paths.
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
def test_batch_and_single_rows_equal_the_per_detector_fusion(orthonormal, k, with_msp):
    sc = _scorer(0, orthonormal, k, with_msp)
    x, lg, ft = _views(1, 50)
    checked = sc.fuse(sc.scores_by_detector(x, lg, ft))
    np.testing.assert_allclose(sc.score(x, lg, ft), checked, rtol=2e-6, atol=1e-5)  # float32 products
    one = np.array([sc.score(x[i : i + 1], lg[i : i + 1], ft[i : i + 1])[0] for i in range(len(x))])
    np.testing.assert_allclose(one, checked, rtol=2e-6, atol=1e-5)


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
    assert sc.score(x.tolist(), lg.tolist(), ft.tolist())[0] == pytest.approx(sc.score(x, lg, ft)[0], abs=1e-5)


def test_swept_memory_storage_is_on_limits_public_contract_with_one_error_wrapper_layer():
    from limits.storage import MemoryStorage, MovingWindowSupport, SlidingWindowCounterSupport, Storage

    assert issubclass(SweptMemoryStorage, (Storage, MovingWindowSupport, SlidingWindowCounterSupport))
    assert not issubclass(SweptMemoryStorage, MemoryStorage)  # nothing of its internals is used
    assert not any("_MemoryStorage__" in name for name in vars(SweptMemoryStorage))
    for name in ("incr", "get", "get_expiry", "check", "reset", "clear", "acquire_entry",
                 "get_moving_window", "acquire_sliding_window_entry", "get_sliding_window"):
        method = getattr(SweptMemoryStorage, name)
        # limits' __init_subclass__ wraps each public method once (functools.wraps): exactly one layer
        assert hasattr(method, "__wrapped__") and not hasattr(method.__wrapped__, "__wrapped__"), name


def test_swept_memory_storage_starts_no_threads_and_reclaims():
    lim = RateLimiter(RateLimitConfig(per_client="3/second"), "memory://")
    assert isinstance(lim.storage, SweptMemoryStorage)
    before = threading.active_count()
    allowed = [lim.hit(f"c{i % 2}") is None for i in range(8)]
    assert allowed == [True, True, True, True, True, True, False, False]  # exact per-client count
    assert threading.active_count() <= before  # no expiry Timer per hit
    assert lim.storage.keys_held() == 2  # entries are held...
    time.sleep(1.1)
    lim.storage.sweep()
    assert lim.storage.keys_held() == 0  # ...and reclaimed once expired
    assert lim.hit("c0") is None  # window moved on


def test_swept_memory_storage_sweeps_inline_without_being_asked():
    lim = RateLimiter(RateLimitConfig(per_client="2/second", strategy="fixed-window"), "memory://")
    for i in range(50):
        lim.hit(f"gone-{i}")
    assert lim.storage.keys_held() == 50
    time.sleep(max(1.05, lim.storage.SWEEP_S + 0.05))
    lim.hit("new")  # the first call after SWEEP_S sweeps the expired keys in this request
    assert lim.storage.keys_held() == 1


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window", "sliding-window-counter"])
def test_swept_memory_storage_counts_like_limits_memory_storage(strategy):
    """Same decisions and window stats as limits' own MemoryStorage, hit for hit."""
    from limits import parse
    from limits.storage import MemoryStorage

    from runtime_guard.ratelimit import STRATEGIES

    ours, theirs = STRATEGIES[strategy](SweptMemoryStorage()), STRATEGIES[strategy](MemoryStorage())
    item = parse("5/second")
    got, want = [], []
    for i in range(24):
        who = f"k{i % 3}"
        got.append((ours.hit(item, who), ours.get_window_stats(item, who).remaining))
        want.append((theirs.hit(item, who), theirs.get_window_stats(item, who).remaining))
        if i == 15:
            time.sleep(1.05)  # every window rolls over (the sliding counter keeps a weighted share)
    assert got == want
    assert sum(ok for ok, _ in got) < len(got)  # the limit was reached, so the comparison means something
    ours.clear(item, "k0")
    assert ours.hit(item, "k0")


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


# -- batch of one vs batches (guard, sanitizer, softmax) ---------------------------------------

def test_softmax_one_row_equals_batched_rows():
    from runtime_guard.output_policy import softmax

    rng = np.random.default_rng(3)
    for c in (2, 6, 64, 65):  # 65: past the one-row cut-off, numpy path either way
        z = (rng.standard_normal((300, c)) * rng.choice([0.1, 5.0, 60.0], size=(300, 1))).astype(np.float32)
        rows = np.concatenate([softmax(z[i:i + 1]) for i in range(len(z))])
        assert rows.dtype == np.float64 and rows.shape == z.shape
        np.testing.assert_allclose(rows, softmax(z), rtol=1e-14, atol=1e-300)
        assert np.all(rows.argmax(axis=1) == z.argmax(axis=1))


@pytest.mark.parametrize("size", [64, 257 * 4])  # Python-float path and numpy-reduction path
def test_sanitizer_value_checks_same_on_both_paths(size):
    from runtime_guard.config import InputSchema
    from runtime_guard.sanitizer import Sanitizer, SanitizerError

    s = Sanitizer(InputSchema(value_range=(0.0, 1.0)), [size])
    ok = np.linspace(0, 1, size, dtype=np.float32)[None]
    assert s(ok) is ok
    for bad, reason in [(np.nan, "non_finite"), (np.inf, "non_finite"), (-np.inf, "non_finite"),
                        (1.5, "range"), (-1e-3, "range")]:
        for pos in (0, size // 2, size - 1):
            x = ok.copy()
            x[0, pos] = bad
            with pytest.raises(SanitizerError) as e:
                s(x)
            assert e.value.reason == reason, (bad, pos)
    clip = Sanitizer(InputSchema(value_range=(0.0, 1.0), out_of_range="clip"), [size])
    x = ok.copy()
    x[0, 1] = 7.0
    assert clip(x)[0, 1] == 1.0 and clip(x).dtype == np.float32


def test_guard_batch_of_one_equals_batch(digits_demo):
    """The guard at batch 1 and at batch N agree exactly
    on labels and decisions, and to float rounding on scores and OOD scores."""
    from runtime_guard.anomaly import AnomalyScorer
    from runtime_guard.config import (
        AnomalyGateConfig,
        ExtractionMonitorConfig,
        GuardConfig,
        InputSchema,
        RateLimitConfig,
    )
    from runtime_guard.guard import GuardedModel

    model = open(digits_demo.model_path, "rb").read()
    with np.load(digits_demo.data_path, allow_pickle=False) as d:
        x = np.concatenate([d["x"][:40], d["ood_heldout"][:20]]).astype(np.float32)
    from hardening.data import load_dataset
    from hardening.ood import export_detectors
    from hardening.ood.pipeline import fit_ensemble, prepare_model

    pm = prepare_model(digits_demo.model_path, load_dataset(digits_demo.data_path))
    ens, _, _ = fit_ensemble(pm, load_dataset(digits_demo.data_path), 0.05)
    scorer = AnomalyScorer.from_bytes(*export_detectors(ens, model=pm.model_meta()))
    cfg = GuardConfig(input=InputSchema(value_range=(0.0, 1.0), max_batch=64),
                      rate_limit=RateLimitConfig(per_client=None), extraction=ExtractionMonitorConfig(enabled=False),
                      anomaly=AnomalyGateConfig(action="flag"))
    g = GuardedModel(model, cfg, scorer)
    batch = g.predict(x, "batch")
    ones = [g.predict(x[i:i + 1], "one") for i in range(len(x))]
    assert [r.label for r in ones] == batch.labels.tolist()
    assert [bool(r.reasons) for r in ones] == [bool(s > scorer.threshold) for s in batch.ood_scores]
    assert 0 < sum(r.decision == "flagged" for r in ones) < len(x)  # both decisions exercised
    np.testing.assert_allclose(np.concatenate([r.scores for r in ones]), batch.scores, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(np.concatenate([r.ood_scores for r in ones]), batch.ood_scores, rtol=0, atol=1e-4)
    nan = x[:1].copy()
    nan[0, 0, 0, 0] = np.nan
    assert g.predict(nan, "one").reasons == ["input:non_finite"]
