"""Rate limiter: exact counts under concurrency, per client and global (60 s windows: no timing flakes)."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from hardening.intake import make_session
from runtime_guard.config import ExtractionMonitorConfig, GuardConfig, GuardConfigError, RateLimitConfig
from runtime_guard.guard import GuardedModel
from runtime_guard.ratelimit import RateLimiter

THREADS = 8


def _hammer(fn, calls_per_thread: int, client_of=lambda t: f"client-{t}") -> Counter:
    """Run ``fn(client)`` from 8 threads released together; count (client, allowed) outcomes."""
    out: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        local: Counter = Counter()
        start.wait()
        for _ in range(calls_per_thread):
            c = client_of(t)
            local[(c, fn(c))] += 1
        with lock:
            out.update(local)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window", "sliding-window-counter"])
def test_per_client_limit_is_exact_under_concurrency(strategy):
    rl = RateLimiter(RateLimitConfig(per_client="37/minute", strategy=strategy))
    # 4 clients, each hit by 2 threads, 50 calls per thread = 100 attempts per client
    res = _hammer(lambda c: rl.hit(c) is None, 50, client_of=lambda t: f"c{t % 4}")
    for c in ("c0", "c1", "c2", "c3"):
        assert res[(c, True)] == 37
        assert res[(c, False)] == 63


def test_global_limit_is_exact_under_concurrency():
    rl = RateLimiter(RateLimitConfig(per_client=None, global_limit="123/minute"))
    res = _hammer(lambda c: rl.hit(c) is None, 40)
    assert sum(v for (c, ok), v in res.items() if ok) == 123
    assert sum(res.values()) == THREADS * 40


def test_client_and_global_together():
    # 8 clients x 30 attempts; per-client 20 would allow 160, the global 100 binds.
    rl = RateLimiter(RateLimitConfig(per_client="20/minute", global_limit="100/minute"))
    scopes: Counter = Counter()

    def hit(c: str) -> bool:
        st = rl.hit(c)
        if st is not None:
            scopes[st.scope] += 1
        return st is None

    res = _hammer(hit, 30)
    assert sum(v for (c, ok), v in res.items() if ok) == 100
    assert all(res[(f"client-{t}", True)] <= 20 for t in range(THREADS))
    # Client-limited refusals happen before the global check, so they do not spend global budget.
    assert scopes["client"] + scopes["global"] == THREADS * 30 - 100


def test_refusal_carries_retry_and_header_info():
    rl = RateLimiter(RateLimitConfig(per_client="3/minute", global_limit="1000/hour"))
    assert rl.status("a").remaining == 3
    for _ in range(3):
        assert rl.hit("a") is None
    st = rl.hit("a")
    assert st is not None and not st.allowed
    assert (st.scope, st.limit, st.remaining) == ("client", 3, 0)
    assert 0 < st.reset_after <= 60
    assert rl.hit("b") is None  # other clients unaffected
    now = rl.status("a")
    assert now.scope == "client" and now.remaining == 0
    assert rl.status("b").remaining == 2


def test_disabled_limits():
    rl = RateLimiter(RateLimitConfig(per_client=None, global_limit=None))
    assert not rl.enabled and rl.status("a") is None and rl.hit("a") is None


def test_bad_rate_strings_are_config_errors():
    for bad in ("lots", "10/fortnight", "", 5):
        with pytest.raises(GuardConfigError):
            RateLimitConfig(per_client=bad)
    with pytest.raises(GuardConfigError):
        RateLimitConfig(strategy="token-bucket")


def test_unknown_storage_uri_fails_loudly():
    from limits.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="nosuch"):
        RateLimiter(RateLimitConfig(), storage_uri="nosuch://x")


def test_guarded_model_rate_limits_before_running_the_model(digits_demo):
    cfg = GuardConfig(
        rate_limit=RateLimitConfig(per_client="5/minute", global_limit="12/minute"),
        extraction=ExtractionMonitorConfig(enabled=False),
    )
    guard = GuardedModel(make_session(digits_demo.model_path), cfg)
    with np.load(digits_demo.data_path) as d:
        x = d["x"][:1]
    decisions = _hammer(lambda c: guard.predict(x, c).decision, 4)  # 8 clients x 4 = 32 attempts
    assert sum(v for (c, dec), v in decisions.items() if dec == "accepted") == 12
    assert sum(v for (c, dec), v in decisions.items() if dec == "rate_limited") == 20
    res = guard.predict(np.full((1, 1, 8, 8), np.nan, dtype=np.float32), "client-0")
    # rate limit is checked first: even a malformed input is answered with rate_limited
    assert res.decision == "rate_limited" and res.retry_after is not None and res.retry_after > 0
    assert res.rate_limit is not None and res.rate_limit.remaining == 0
    snap = guard.snapshot()
    assert snap["decisions"]["accepted"] == 12 and snap["decisions"]["rate_limited"] == 21


@pytest.fixture
def redis_uri(tmp_path):
    """A throwaway redis-server on 127.0.0.1 (`make test` needs Debian's redis-server; .ci/run installs it)."""
    import shutil
    import socket
    import subprocess
    import time

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server not installed: apt-get install redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_shared_redis_storage_enforces_one_budget_across_limiters(redis_uri):
    # Two limiters = two worker processes sharing one Redis; 8 threads split between them.
    cfg = RateLimitConfig(per_client="25/minute", global_limit="60/minute")
    a, b = RateLimiter(cfg, redis_uri), RateLimiter(cfg, redis_uri)
    res = _hammer(lambda c: (a if c[-1] in "0246" else b).hit(c[:-1] + str(int(c[-1]) % 3)) is None, 20)
    accepted = Counter()
    for (c, ok), v in res.items():
        if ok:
            accepted[c[:-1] + str(int(c[-1]) % 3)] += v
    assert sum(accepted.values()) == 60
    assert all(v <= 25 for v in accepted.values())
    assert a.status("client-0").remaining == b.status("client-0").remaining
