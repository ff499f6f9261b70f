"""Unit-level checks of the reliability pieces (the fault suite drives them end to end)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import requests

from api_fixtures import api_env, bundle_v1, json_body  # noqa: F401
from servers import ServerProcess, free_port, run_cli


def test_deadline_terminates_a_loop_and_guard_refuses_it():
    from runtime_guard.config import GuardConfig
    from runtime_guard.deadline import Deadline, DeadlineExceeded
    from runtime_guard.guard import GuardedModel

    from hostile_models import loop_bomb

    cfg = GuardConfig.from_dict({"input": {"value_range": [0.0, 1.0]}, "anomaly": {"action": "off"}})
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        GuardedModel(loop_bomb(), cfg, deadline=Deadline(0.5))
    assert info.value.check == "deadline" and time.monotonic() - t0 < 5


def test_a_stuck_candidate_is_abandoned_and_the_reload_lock_released():
    from api.reload import Deployment, ModelHolder, ReloadRefused

    release = threading.Event()

    def loader(source, deadline):
        if source == "stuck":
            release.wait(30)  # a run terminate cannot stop (e.g. session creation)
        return Deployment(model=None, version=int(source == "good") + 1, name="m",
                          manifest_sha256=source, source=source)

    holder = ModelHolder(loader, lambda dep, deadline=None: None, deadline_s=0.3)
    holder.load_initial("first")
    t0 = time.monotonic()
    with pytest.raises(ReloadRefused) as info:
        holder.reload("stuck")
    assert info.value.check == "deadline" and time.monotonic() - t0 < 3
    assert holder.reload("good").outcome == "swapped"  # the lock is free again
    release.set()


def test_loader_failures_become_named_refusals():
    from api.reload import ModelHolder, ReloadRefused

    def loader(source, deadline):
        raise {"io": FileNotFoundError(2, "No such file"), "odd": IndexError("tuple index")}[source]

    holder = ModelHolder(loader, lambda dep, deadline=None: None)
    for source, check in (("io", "io"), ("odd", "load")):
        with pytest.raises(ReloadRefused) as info:
            holder.load_initial(source)
        assert info.value.check == check


def test_storage_outage_raises_storage_unavailable_and_logs_once(caplog):
    from runtime_guard.config import RateLimitConfig
    from runtime_guard.ratelimit import RateLimiter, StorageUnavailable

    limiter = RateLimiter(RateLimitConfig(per_client="10/minute"),
                          f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="runtime_guard.ratelimit"):
        for _ in range(5):
            with pytest.raises(StorageUnavailable) as info:
                limiter.hit("c")
    assert info.value.cause and "redis://" not in str(info.value)
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    assert not limiter.health.ok and not limiter.health.probe()


def test_connection_table_keeps_a_reserve_for_new_peers():
    from api.connections import ConnectionLimits, ConnectionTable

    table = ConnectionTable(ConnectionLimits(header_timeout_s=1, max_total=10, per_peer=5, reserve=3))

    class Fake:
        def __init__(self, peer):
            self.peer, self.state, self.started, self.reaped = peer, 0, time.monotonic(), False

        def shutdown(self, how):
            self.reaped_by = how

    def take(peer):
        ok = table.admit(peer)
        if ok:
            table.add(Fake(peer))
        return ok

    assert all(take("a") for _ in range(5)) and not take("a")  # per-peer cap
    assert take("b") and take("b")  # total 7 = max_total - reserve
    assert not take("b") and not take("a")  # peers holding connections stop at the reserve
    assert take("c") and take("d") and take("e")  # the reserve is for peers holding none
    assert not take("f")  # the total cap binds everyone
    assert table.reap(time.monotonic() + 2) == 10  # all still in their header block


def test_readiness_reports_draining(api_env, bundle_v1):
    from api import create_app
    from api.state import EXT

    app = create_app(api_env.app_config(bundle_v1))
    c = app.test_client()
    assert c.get("/readyz").status_code == 200
    app.extensions[EXT].draining = True
    r = c.get("/readyz")
    assert r.status_code == 503 and r.get_json()["check"] == "draining" and r.headers["Retry-After"]
    assert c.get("/v2/health/ready").status_code == 503


def test_api_key_add_into_missing_folder_is_one_line(tmp_path):
    r = run_cli(["api-key", "add", str(tmp_path / "nodir" / "keys.json"), "--id", "a"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "No such file" in r.stderr


def test_serve_passphrase_wrapped_bundle(api_env, tmp_path, monkeypatch):
    from runtime_guard.bundle import Kek, write_bundle

    path = tmp_path / "pw.ewb"
    write_bundle(path, {"model": api_env.model_bytes},
                 {"model": {"name": "digits"}, "runtime": api_env.runtime(), "smoke_test": api_env.golden()},
                 api_env.signing_key, Kek("passphrase", b"correct horse battery"), 1)
    monkeypatch.setenv("EW_TEST_PASSPHRASE", "correct horse battery")
    args = [str(path), "--public-key", str(api_env.public_key_path), "--passphrase-env", "EW_TEST_PASSPHRASE"]
    with ServerProcess(args, tmp_path / "server.log") as srv:
        r = requests.post(srv.url + "/v1/predict", data=json_body(api_env.x[:2]),
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["labels"] == api_env.labels[:2].tolist()
    monkeypatch.setenv("EW_TEST_PASSPHRASE", "wrong")
    r = run_cli(["serve", *args])
    assert r.returncode == 2 and "Traceback" not in r.stderr
