"""Integration tests: the real ``edgeward serve`` process over HTTP on a free loopback port."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from api_fixtures import ADMIN_TOKEN, api_env, bundle_v1, json_body  # noqa: F401
from servers import RedisServer, ServerProcess, run_cli

JSON = {"Content-Type": "application/json"}
ADMIN = {"Authorization": "Bearer " + ADMIN_TOKEN}


def test_serve_end_to_end_with_keys(api_env, bundle_v1, tmp_path):
    keys = tmp_path / "keys.json"
    out = run_cli(["api-key", "add", str(keys), "--id", "bob", "--json"])
    assert out.returncode == 0, out.stderr
    key = json.loads(out.stdout)["key"]
    assert key not in keys.read_text()
    listed = run_cli(["api-key", "list", str(keys), "--json"])
    assert json.loads(listed.stdout)[0]["id"] == "bob"

    args = api_env.serve_args(bundle_v1, "--api-keys", str(keys), "--admin-token-file",
                              str(api_env.admin_token_path), "--max-body-bytes", "65536")
    with ServerProcess(args, tmp_path / "server.log") as srv:
        u = srv.url
        body = json_body(api_env.x[:4])
        r = requests.post(u + "/v1/predict", data=body, headers={**JSON, "Authorization": "Bearer " + key})
        assert r.status_code == 200 and r.json()["labels"] == api_env.labels[:4].tolist()
        r = requests.post(u + "/v1/predict", data=body, headers=JSON)
        assert r.status_code == 401 and r.headers["Content-Type"] == "application/problem+json"
        # a client key is not an admin token
        assert requests.post(u + "/v1/admin/reload", headers={"Authorization": "Bearer " + key}).status_code == 403
        # body limits: declared length and chunked streaming both give a JSON 413
        big = b"[" + b"0," * 40000 + b"0]"
        r = requests.post(u + "/v1/predict", data=big, headers={**JSON, "X-API-Key": key})
        assert r.status_code == 413 and r.json()["status"] == 413
        r = requests.post(u + "/v1/predict", data=iter([big[:40000], big[40000:]]),
                          headers={**JSON, "X-API-Key": key})
        assert r.status_code == 413 and r.json()["status"] == 413
        assert requests.post(u + "/v1/predict", data=b"a,b", headers={"Content-Type": "text/csv",
                                                                      "X-API-Key": key}).status_code == 415
        assert requests.get(u + "/nope").json()["status"] == 404
        metrics = requests.get(u + "/metrics")
        assert metrics.headers["Content-Type"].startswith("text/plain")
        assert 'status="401"' in metrics.text and "edgeward_drift_psi" in metrics.text
        assert requests.get(u + "/openapi.json").json()["openapi"].startswith("3.")
        v2 = requests.post(u + "/v2/models/digits/infer", headers={"X-API-Key": key}, json={
            "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": api_env.x[0].ravel().tolist()}]})
        assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == [int(api_env.labels[0])]
        assert requests.get(u + "/v2/health/ready").json() == {"ready": True}
    assert srv.proc.returncode is not None


def test_serve_refuses_bad_start(api_env, bundle_v1, tmp_path):
    tampered = tmp_path / "t.ewb"
    data = bytearray(bundle_v1.read_bytes())
    data[-10] ^= 1
    tampered.write_bytes(bytes(data))
    r = run_cli(["serve", *api_env.serve_args(tampered)])
    assert r.returncode == 2 and "chunk-auth" in r.stderr
    r = run_cli(["serve", *api_env.serve_args(tmp_path / "missing.ewb")])
    assert r.returncode == 2
    r = run_cli(["serve", *api_env.serve_args(bundle_v1, "--workers", "2", "--require-shared-storage")])
    assert r.returncode == 2 and "memory://" in r.stderr
    r = run_cli(["serve", str(bundle_v1), "--public-key", str(api_env.public_key_path)])
    assert r.returncode == 2 and "--key-file" in r.stderr


def _load(url: str, clients: int, per_client: int, body: str, stop: threading.Event | None = None):
    """``clients`` threads, each with a keep-alive session, ``per_client`` requests.
    Returns [(status, version)] in order per client."""

    def run(_i: int):
        out = []
        with requests.Session() as s:
            for _ in range(per_client):
                if stop is not None and stop.is_set():
                    break
                try:
                    r = s.post(url + "/v1/predict", data=body, headers=JSON, timeout=30)
                    out.append((r.status_code, r.json().get("model", {}).get("version")))
                except requests.RequestException as exc:
                    out.append((type(exc).__name__, None))
        return out

    with ThreadPoolExecutor(clients) as ex:
        return list(ex.map(run, range(clients)))


def _load_until(url: str, clients: int, body: str, started: threading.Barrier, done: threading.Event,
                final_version: int, max_requests: int = 2000, max_seconds: float = 120.0):
    """``clients`` keep-alive clients that each send requests until ``done`` is set *and* they
    have been answered by ``final_version`` (bounded in count and time).
    Each waits on ``started`` after its first answer, so the caller knows load is running."""

    def run(_i: int):
        out = []
        deadline = time.monotonic() + max_seconds
        with requests.Session() as s:
            while len(out) < max_requests and time.monotonic() < deadline:
                try:
                    r = s.post(url + "/v1/predict", data=body, headers=JSON, timeout=30)
                    out.append((r.status_code, r.json().get("model", {}).get("version")))
                except requests.RequestException as exc:
                    out.append((type(exc).__name__, None))
                if len(out) == 1:
                    started.wait(timeout=60)
                if done.is_set() and out[-1][1] == final_version:
                    break
        return out

    with ThreadPoolExecutor(clients) as ex:
        return list(ex.map(run, range(clients)))


def test_hot_update_under_load(api_env, bundle_v1, tmp_path):
    """By construction: every client is answered by v1 before the reload starts and keeps
    sending until it has been answered by v2 after the reload returned."""
    from runtime_guard.bundle import generate_signing_keypair

    v2 = api_env.make_bundle(tmp_path / "v2.ewb", 2)
    forged = api_env.make_bundle(tmp_path / "forged.ewb", 3, signing_key=generate_signing_keypair()[0])
    smoke_fail = api_env.make_bundle(tmp_path / "smoke.ewb", 4, golden=api_env.golden(wrong=True))
    args = api_env.serve_args(bundle_v1, "--admin-token-file", str(api_env.admin_token_path))
    clients = 8
    with ServerProcess(args, tmp_path / "server.log") as srv:
        body = json_body(api_env.x[:2])
        results: list = []
        started = threading.Barrier(clients + 1)
        done = threading.Event()
        t = threading.Thread(target=lambda: results.extend(_load_until(srv.url, clients, body, started, done, 2)))
        t.start()
        started.wait(timeout=60)  # every client has been answered once, by v1
        r = requests.post(srv.url + "/v1/admin/reload", json={"path": str(v2)}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["outcome"] == "swapped"
        for bad, check in ((bundle_v1, "version"), (forged, "signature"), (smoke_fail, "smoke-test")):
            r = requests.post(srv.url + "/v1/admin/reload", json={"path": str(bad)}, headers=ADMIN)
            assert r.status_code == 409 and r.json()["check"] == check
        done.set()
        t.join()
        flat = [x for per in results for x in per]
        assert len(results) == clients
        assert all(status == 200 for status, _ in flat), {s for s, _ in flat}
        for per in results:  # each client saw v1 first, v2 last, and never went back
            versions = [v for _, v in per]
            assert versions[0] == 1 and versions[-1] == 2 and versions == sorted(versions), versions
        assert requests.get(srv.url + "/v1/model").json()["version"] == 2


def test_watch_directory_swaps_in_new_bundle(api_env, bundle_v1, tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    args = api_env.serve_args(bundle_v1, "--watch", str(watch), "--watch-interval", "0.2")
    with ServerProcess(args, tmp_path / "server.log") as srv:
        api_env.make_bundle(watch / "old.ewb", 1, golden=api_env.golden(n=4))  # not newer: ignored
        api_env.make_bundle(watch / "bad.ewb", 7, golden=api_env.golden(wrong=True))  # refused
        time.sleep(0.6)
        assert requests.get(srv.url + "/v1/model").json()["version"] == 1
        api_env.make_bundle(watch / "new.ewb", 5)
        deadline = time.time() + 15
        while requests.get(srv.url + "/v1/model").json()["version"] != 5 and time.time() < deadline:
            time.sleep(0.1)
        assert requests.get(srv.url + "/v1/model").json()["version"] == 5


@pytest.mark.skipif(not RedisServer.available(), reason="redis-server not installed")
def test_workers_share_rate_limit_through_redis(api_env, tmp_path):
    limit = 30
    b = api_env.make_bundle(tmp_path / "rl.ewb", 1, runtime=api_env.runtime(per_client=f"{limit}/minute"))
    body = json_body(api_env.x[:1])

    def accepted(server: ServerProcess) -> tuple[int, set[int]]:
        pids = {requests.get(server.url + "/healthz").json()["pid"] for _ in range(40)}
        res = _load(server.url, 6, 15, body)  # 90 requests, one client id (remote address)
        statuses = [s for per in res for s, _ in per]
        assert set(statuses) <= {200, 429}, set(statuses)
        return statuses.count(200), pids

    with RedisServer(tmp_path) as redis_srv:
        args = api_env.serve_args(b, "--workers", "2", "--storage-uri", redis_srv.url,
                                  "--require-shared-storage")
        with ServerProcess(args, tmp_path / "redis-workers.log") as srv:
            _wait_for_workers(srv, 2)
            count, pids = accepted(srv)
            assert len(pids) == 2  # both workers answered
            assert count == limit  # exactly the limit across both workers
    # contrast: per-process memory storage lets each worker grant the full limit
    args = api_env.serve_args(b, "--workers", "2")
    with ServerProcess(args, tmp_path / "memory-workers.log") as srv:
        _wait_for_workers(srv, 2)
        count, _ = accepted(srv)
        assert count > limit
        assert "warning" in srv.log()


def _wait_for_workers(srv: ServerProcess, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = {requests.get(srv.url + "/healthz").json()["pid"] for _ in range(20)}
        if len(pids) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {len(pids)} of {n} workers answered:\n{srv.log()}")


def _rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def _load_test(api_env, bundle, tmp_path, seconds: float, max_requests: int) -> dict:
    psutil = pytest.importorskip("psutil")
    with ServerProcess(api_env.serve_args(bundle, "--threads", "8"), tmp_path / "load.log") as srv:
        body = json_body(api_env.x[:1])
        _load(srv.url, 16, 20, body)  # warm-up: allocator and session pools settle
        rss0 = _rss(srv.pid)
        stop = threading.Event()
        samples = [rss0]
        timer = threading.Timer(seconds, stop.set)
        timer.start()
        sampler_stop = threading.Event()

        def sample():
            while not sampler_stop.wait(0.25):
                samples.append(psutil.Process(srv.pid).memory_info().rss)

        st = threading.Thread(target=sample)
        st.start()
        t0 = time.time()
        res = _load(srv.url, 16, max_requests // 16, body, stop)
        elapsed = time.time() - t0
        sampler_stop.set()
        st.join()
        timer.cancel()
        rss1 = _rss(srv.pid)
    flat = [s for per in res for s, _ in per]
    return {"n": len(flat), "errors": sum(s != 200 for s in flat), "rss0": rss0, "rss1": rss1,
            "max_rss": max(samples), "elapsed": elapsed}


def test_short_load_no_errors_flat_memory(api_env, bundle_v1, tmp_path):
    out = _load_test(api_env, bundle_v1, tmp_path, seconds=5, max_requests=16 * 150)
    print("short load:", out)
    assert out["n"] > 0 and out["errors"] == 0, out
    assert out["max_rss"] <= out["rss0"] * 1.15 + 16 * 2**20, out


@pytest.mark.slow
def test_long_load_no_errors_flat_memory(api_env, bundle_v1, tmp_path):
    out = _load_test(api_env, bundle_v1, tmp_path, seconds=20, max_requests=16 * 1500)
    print("long load:", out)
    assert out["n"] > 0 and out["errors"] == 0, out
    assert out["max_rss"] <= out["rss0"] * 1.10 + 16 * 2**20, out
