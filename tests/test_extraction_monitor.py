"""PRADA monitor: Shapiro-Wilk matches scipy; JBDA-like streams are flagged, benign digits are not."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from hardening.intake import make_session
from runtime_guard.config import ExtractionMonitorConfig, GuardConfig, GuardConfigError, RateLimitConfig
from runtime_guard.extraction_monitor import ExtractionMonitor, norm_ppf, shapiro_wilk
from runtime_guard.guard import GuardedModel

# Honest defaults under test: delta 0.90, first test after 50 distances, then every query here.
CFG = ExtractionMonitorConfig(delta=0.90, min_queries=50, test_every=1)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 11, 12, 25, 100, 499, 2000, 5000])
@pytest.mark.parametrize("dist", ["normal", "exponential", "uniform", "lognormal"])
def test_shapiro_wilk_matches_scipy(n, dist):
    rng = np.random.default_rng(n)
    x = getattr(rng, dist)(size=n)
    w, p = shapiro_wilk(x)
    ref = scipy.stats.shapiro(x)
    assert w == pytest.approx(ref.statistic, abs=1e-6)
    assert p == pytest.approx(ref.pvalue, abs=1e-5)


def test_shapiro_wilk_rejects_degenerate_input():
    for bad in (np.ones(10), np.arange(2.0), np.arange(5001.0), np.array([1.0, np.nan, 2.0, 3.0])):
        with pytest.raises(ValueError):
            shapiro_wilk(bad)


def test_norm_ppf_matches_scipy():
    p = np.concatenate([np.logspace(-12, -1, 50), np.linspace(0.01, 0.99, 99), 1 - np.logspace(-12, -1, 50)])
    np.testing.assert_allclose(norm_ppf(p), scipy.stats.norm.ppf(p), rtol=1e-8, atol=1e-10)


@pytest.fixture(scope="module")
def digits(digits_demo):
    sess = make_session(digits_demo.model_path)
    with np.load(digits_demo.data_path) as d:
        data = {k: d[k] for k in d.files}

    def labels(x: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"input": x.astype(np.float32)})[0].argmax(1)

    return data, labels, sess


def _stream(monitor: ExtractionMonitor, client: str, xs: np.ndarray, labels) -> None:
    lab = labels(xs)
    for i in range(len(xs)):
        monitor.observe(client, xs[i : i + 1], lab[i : i + 1])


def _jbda_like(seeds: np.ndarray, n: int, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Papernot-style augmentation: each round adds x + lam * sign(direction) for every
    sample so far (random directions stand in for Jacobian signs the attacker would use)."""
    out, pool = [seeds], seeds
    while sum(len(a) for a in out) < n:
        new = np.clip(pool + lam * np.sign(rng.standard_normal(pool.shape)), 0, 1).astype(np.float32)
        out.append(new)
        pool = np.concatenate([pool, new])
    return np.concatenate(out)[:n]


def test_benign_digits_are_not_flagged(digits):
    data, labels, _ = digits
    benign = np.concatenate([data["x"], data["x_cal"], data["x_train"]])
    rng = np.random.default_rng(0)
    mon = ExtractionMonitor(CFG)
    for k in range(5):  # five clients, each 300 benign queries in a different order
        _stream(mon, f"benign{k}", benign[rng.permutation(len(benign))[:300]], labels)
        st = mon.state(f"benign{k}")
        assert st.queries == 300 and st.flagged_after is None, st
        assert st.min_w > CFG.delta  # observed min W ~0.92-0.97 over 250 tests per client
    assert mon.snapshot()["flagged_clients"] == 0


@pytest.mark.parametrize("lam, n_seeds", [(0.05, 6), (0.1, 10), (0.2, 20)])
def test_jbda_like_stream_is_flagged_quickly(digits, lam, n_seeds):
    data, labels, _ = digits
    rng = np.random.default_rng(1)
    seeds = data["x_thief"][rng.permutation(len(data["x_thief"]))[:n_seeds]]
    mon = ExtractionMonitor(CFG)
    _stream(mon, "thief", _jbda_like(seeds, 300, lam, rng), labels)
    st = mon.state("thief")
    assert st.flagged and st.flagged_after is not None and st.flagged_after <= 100, st
    assert mon.snapshot()["flags_total"] == 1


def test_repeated_query_is_flagged(digits):
    data, labels, _ = digits
    mon = ExtractionMonitor(CFG)
    _stream(mon, "rep", np.repeat(data["x"][:3], 40, axis=0), labels)
    assert mon.state("rep").flagged


def test_memory_is_bounded_and_clients_are_evicted_lru():
    cfg = ExtractionMonitorConfig(per_class_history=4, max_distances=20, min_queries=10, max_clients=3)
    mon = ExtractionMonitor(cfg)
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        for _ in range(50):
            mon.observe(c, rng.random((2, 1, 8, 8), dtype=np.float32), np.array([0, 1]))
    st = mon._clients["a"]  # white-box: check the bounds themselves
    assert st.nd == 20 and len(st.dist) == 20
    assert all(cs.n <= 4 and cs.buf.shape == (4, 64) for cs in st.classes.values())
    mon.observe("a", rng.random((1, 1, 8, 8), dtype=np.float32), np.array([0]))  # refresh a
    mon.observe("d", rng.random((1, 1, 8, 8), dtype=np.float32), np.array([0]))  # evicts b, the LRU
    assert mon.state("b") is None and mon.state("a") is not None and mon.state("d") is not None
    assert mon.snapshot()["tracked_clients"] == 3 and mon.snapshot()["evictions"] == 1


def test_throttle_expires_and_resets_history(digits):
    data, labels, _ = digits
    now = [1000.0]
    mon = ExtractionMonitor(
        ExtractionMonitorConfig(min_queries=50, test_every=1, action="throttle", throttle_seconds=60),
        clock=lambda: now[0],
    )
    _stream(mon, "rep", np.repeat(data["x"][:2], 40, axis=0), labels)
    assert mon.throttled_for("rep") == pytest.approx(60)
    now[0] += 59
    assert mon.throttled_for("rep") == pytest.approx(1)
    now[0] += 2
    assert mon.throttled_for("rep") == 0.0 and mon.state("rep") is None


def test_guard_flags_and_throttles_an_extraction_client(digits):
    data, _, sess = digits
    rng = np.random.default_rng(2)
    attack = _jbda_like(data["x_thief"][:8], 150, 0.05, rng)
    benign = data["x"]
    for action in ("flag", "throttle"):
        cfg = GuardConfig(
            rate_limit=RateLimitConfig(per_client=None),
            extraction=ExtractionMonitorConfig(min_queries=50, test_every=1, action=action),
        )
        guard = GuardedModel(sess, cfg)
        decisions = [guard.predict(x, "thief").decision for x in attack]
        for x in benign:
            assert guard.predict(x, "honest").decision == "accepted"
        first = decisions.index("flagged")
        st = guard.monitor_state("thief")
        assert st.flagged_after == first + 1 <= 100
        if action == "flag":
            assert set(decisions[first:]) == {"flagged"}  # sticky, still answered
        else:
            assert set(decisions[first + 1 :]) == {"rate_limited"}
            res = guard.predict(attack[0], "thief")
            assert res.reasons == ["extraction:throttled"] and res.retry_after > 0
        assert guard.monitor_state("honest").flagged_after is None


def test_throttle_interval_shrinks_the_flagged_clients_rate_budget(digits):
    data, labels, _ = digits
    now = [1000.0]
    mon = ExtractionMonitor(
        ExtractionMonitorConfig(min_queries=50, test_every=1, action="throttle", throttle_seconds=60,
                                throttle_interval=10),
        clock=lambda: now[0],
    )
    assert mon.throttled_for("rep") == 0.0  # unknown client: not throttled
    _stream(mon, "rep", np.repeat(data["x"][:2], 40, axis=0), labels)
    assert mon.state("rep").flagged
    assert mon.throttled_for("rep") == pytest.approx(10)  # the next slot, not the whole window
    now[0] += 10
    assert mon.throttled_for("rep") == 0.0  # admitted: this books the slot
    assert mon.throttled_for("rep") == pytest.approx(10)  # so an immediate second query waits
    now[0] += 4
    assert mon.throttled_for("rep") == pytest.approx(6)
    now[0] += 47  # past the 60 s window: history forgotten, full rate again
    assert mon.throttled_for("rep") == 0.0 and mon.state("rep") is None
    with pytest.raises(GuardConfigError):
        ExtractionMonitorConfig(action="throttle", throttle_interval=0)


def test_stored_history_stays_within_the_byte_budget_whatever_the_clients_do():
    # 3x96x96 inputs: without the budget each client could hold 10 x 128 rows of 108 KiB.
    cfg = ExtractionMonitorConfig(max_history_mb=4.0, min_queries=10)
    mon = ExtractionMonitor(cfg)
    rng = np.random.default_rng(0)
    budget = (4 << 20) + 10 * 3 * 96 * 96 * 4  # + the first row of each class of a client that alone fills it
    for client in range(12):  # an attacker rotating ids
        x = rng.random((40, 3, 96, 96), dtype=np.float32)
        mon.observe(f"c{client}", x, rng.integers(0, 10, 40))
        assert mon._bytes <= budget
        assert mon._bytes == sum(sum(cs.buf.nbytes for cs in st.classes.values()) for st in mon._clients.values())
    assert mon.evictions > 0 and mon.state("c11").queries == 40  # the newest client is kept
    x = rng.random((400, 3, 96, 96), dtype=np.float32)
    mon.observe("alone", x, np.zeros(400, dtype=np.int64))  # one client alone fills the budget
    assert mon._bytes <= budget and mon.state("alone").queries == 400
    mon.reset()
    assert mon._bytes == 0
