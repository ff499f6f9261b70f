"""Fleet updates end to end: a TUF repository served by http.server on 127.0.0.1 and real
``edgeward serve --update-from`` device processes.

* TUF attacks against a serving device: each refused with its check, the model keeps serving.
* Staged rollout: a bad model (fails on live traffic, passes every static check) released
  to 25% installs only on that cohort, is rolled back on all of it by the probation
  triggers, and no request outside the cohort fails.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fleet_fixtures import StaticServer, attested_bundle, new_repo, serve_copy, snapshot_repo

from runtime_guard.update.cohort import in_cohort

from api_fixtures import ADMIN_TOKEN, api_env, crashing_model, json_body  # noqa: F401
from servers import ServerProcess

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"Content-Type": "application/json"}


def _device(api_env, tmp_path, url, device_id, *extra):
    root = tmp_path / "repo" / "metadata" / "1.root.json"
    args = api_env.serve_args(None, "--update-from", url, "--state-dir", str(tmp_path / f"state-{device_id}"),
                              "--device-id", device_id, "--trusted-root", str(root),
                              "--admin-token-file", str(api_env.admin_token_path), *extra)
    return ServerProcess(args, tmp_path / f"{device_id}.log")


def _version(srv) -> int:
    r = requests.post(srv.url + "/v1/predict", data=json_body(_x_ok()), headers=JSON, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["model"]["version"]


_X: list = []


def _x_ok():
    return _X[0][:1]


def test_tuf_attacks_are_refused_while_the_device_keeps_serving(api_env, tmp_path):
    _X[:] = [api_env.x]
    repo = new_repo(tmp_path, targets=2)
    served = tmp_path / "served"
    served.mkdir()
    b1 = attested_bundle(api_env, tmp_path / "digits-v1.ewb", 1)
    repo.publish(b1, public_key=str(api_env.public_key_path))
    good1 = snapshot_repo(tmp_path / "repo", tmp_path / "good1")
    serve_copy(good1, served)
    with StaticServer(served, tmp_path / "http.log") as http, \
            _device(api_env, tmp_path, http.url, "dev-a", "--update-interval", "3600",
                    "--probation-seconds", "0.5") as dev:
        assert _version(dev) == 1
        b2 = attested_bundle(api_env, tmp_path / "digits-v2.ewb", 2)
        rel2 = repo.publish(b2)
        good2 = snapshot_repo(tmp_path / "repo", tmp_path / "good2")
        seen = {}

        def attempt(check, serving):
            r = requests.post(dev.url + "/v1/admin/update", headers=ADMIN, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["outcome"] == "refused" and body["check"] == check, body
            assert _version(dev) == serving  # the running model keeps serving
            seen[check] = seen.get(check, 0) + 1

        def install(version):
            r = requests.post(dev.url + "/v1/admin/update", headers=ADMIN, timeout=30).json()
            assert r["outcome"] in ("installed", "current") and r["version"] == version, r
            assert _version(dev) == version

        serve_copy(good2, served)  # wrong hash: the mirror swapped the bundle bytes
        (f,) = (served / "targets" / "bundles" / "v2").glob("*.digits-v2.ewb")
        f.write_bytes(bytes(f.stat().st_size))
        attempt("tuf-hash", 1)
        serve_copy(good1, served)  # mix-and-match: old snapshot, newer targets under its name
        (served / "metadata" / "1.targets.json").write_bytes((good2 / "metadata" / "2.targets.json").read_bytes())
        attempt("tuf-version", 1)
        serve_copy(good2, served)
        install(2)
        serve_copy(good1, served)  # rollback of the metadata to an older, validly signed state
        attempt("tuf-version", 2)
        repo.refresh_timestamp(expires_in_s=-60)  # freeze: a timestamp replayed after it expired
        serve_copy(tmp_path / "repo", served)
        attempt("tuf-expired", 2)
        repo.refresh_timestamp()
        keyids = repo.load("root").signed.roles["targets"].keyids
        from test_fleet import _attacker_copy, _sign_as_attacker

        b3 = attested_bundle(api_env, tmp_path / "evil.ewb", 3)
        attacker = _attacker_copy(tmp_path)  # below threshold: one of two targets keys
        t = attacker.load("targets")
        attacker._add_file(t, rel2.target, b3, t.signed.targets[rel2.target].custom)
        _sign_as_attacker(attacker, t, [repo.load_signer(keyids[0])])
        serve_copy(tmp_path / "attacker", served)
        attempt("tuf-signature", 2)
        repo.rotate("targets")  # compromised keys rotated out; device learns root v2
        serve_copy(tmp_path / "repo", served)
        install(2)
        attacker = _attacker_copy(tmp_path)
        t = attacker.load("targets")
        attacker._add_file(t, rel2.target, b3, t.signed.targets[rel2.target].custom)
        _sign_as_attacker(attacker, t, [repo.load_signer(k, revoked=True) for k in keyids])
        serve_copy(tmp_path / "attacker", served)
        attempt("tuf-signature", 2)
        status = requests.get(dev.url + "/v1/admin/status", headers=ADMIN, timeout=10).json()
        assert status["update"]["last_check"]["check"] == "tuf-signature"
        metrics = requests.get(dev.url + "/metrics", timeout=10).text
        assert 'edgeward_update_checks_total{outcome="refused"} 6.0' in metrics
    assert seen == {"tuf-hash": 1, "tuf-version": 2, "tuf-expired": 1, "tuf-signature": 2}


def _fleet_ids(n: int, pct: int) -> list[str]:
    """The first ``n`` device ids of a numbered fleet, picked so the cohort is exactly n*pct/100
    (the hash decides membership; this just avoids a fleet where chance put none in it)."""
    want = n * pct // 100
    inside = [f"device-{i:03d}" for i in range(1000) if in_cohort(f"device-{i:03d}", "stable", pct)][:want]
    outside = [f"device-{i:03d}" for i in range(1000) if not in_cohort(f"device-{i:03d}", "stable", pct)][:n - want]
    return sorted(inside + outside)


def _rollout(api_env, tmp_path, n_devices: int) -> dict:
    _X[:] = [api_env.x]
    repo = new_repo(tmp_path)
    b1 = attested_bundle(api_env, tmp_path / "digits-v1.ewb", 1)
    repo.publish(b1)
    ids = _fleet_ids(n_devices, 25)
    cohort = {d for d in ids if in_cohort(d, "stable", 25)}
    x_ok = api_env.x[:1]
    x_fault = api_env.x[:1].copy()
    x_fault[0, 0, 0, 0] = 1.0  # the bad model's fault: only live traffic reaches it
    figures: dict = {"devices": n_devices, "cohort": len(cohort)}
    with StaticServer(tmp_path / "repo", tmp_path / "http.log") as http:
        devices = {d: _device(api_env, tmp_path, http.url, d, "--update-interval", "0.5",
                              "--probation-seconds", "30", "--rollback-min-requests", "10",
                              "--rollback-error-rate", "0.2") for d in ids}
        try:
            t0 = time.time()
            with ThreadPoolExecutor(len(ids)) as pool:
                list(pool.map(lambda s: s.start(timeout=120), devices.values()))
            figures["fleet_start_s"] = round(time.time() - t0, 1)
            assert all(_version(s) == 1 for s in devices.values())

            def hammer(item, n=40):
                d, srv = item
                codes = []
                for i in range(n):
                    x = x_fault if i % 2 else x_ok
                    r = requests.post(srv.url + "/v1/predict", data=json_body(x), headers=JSON, timeout=30)
                    codes.append((r.status_code, (r.json().get("model") or {}).get("version")
                                  if r.status_code == 200 else None))
                return d, codes

            with ThreadPoolExecutor(len(ids)) as pool:  # reference traffic on v1
                list(pool.map(lambda it: hammer(it, 20), devices.items()))
            bad = attested_bundle(api_env, tmp_path / "digits-v2.ewb", 2,
                                  model_bytes=crashing_model(api_env.model_bytes))
            repo.publish(bad, percentage=25)
            t1 = time.time()
            deadline = t1 + 30
            installed: set[str] = set()
            while time.time() < deadline and installed != cohort:
                for d, srv in devices.items():
                    st = requests.get(srv.url + "/v1/admin/status", headers=ADMIN, timeout=10).json()
                    if st["current"]["version"] == 2:
                        installed.add(d)
                time.sleep(0.2)
            figures["install_s"] = round(time.time() - t1, 1)
            for srv in devices.values():  # out-of-cohort devices have checked since the publish
                requests.post(srv.url + "/v1/admin/update", headers=ADMIN, timeout=30)
            with ThreadPoolExecutor(len(ids)) as pool:
                results = dict(pool.map(hammer, devices.items()))
            statuses = {d: requests.get(s.url + "/v1/admin/status", headers=ADMIN, timeout=10).json()
                        for d, s in devices.items()}
            for srv in devices.values():  # the rolled-back release is not installed again
                requests.post(srv.url + "/v1/admin/update", headers=ADMIN, timeout=30)
            after = {d: _version(s) for d, s in devices.items()}
            metrics = {d: requests.get(s.url + "/metrics", timeout=10).text for d, s in devices.items()}
            d0 = sorted(cohort)[0]  # restart a rolled-back device: slot A at once, v2 never again
            devices[d0].stop()
            devices[d0] = _device(api_env, tmp_path, http.url, d0, "--update-interval", "0.5").start(timeout=120)
            check = requests.post(devices[d0].url + "/v1/admin/update", headers=ADMIN, timeout=30).json()
            figures["after_restart"] = {"version": _version(devices[d0]), "check": check["outcome"]}
        finally:
            for s in devices.values():
                s.stop()
    # the updater's persistent record, not last_event: a periodic check that raced the rollback
    # (it ran before the rolled-back digest reached the updater) is refused as known-bad after it
    rolled = {d for d, st in statuses.items() if (st.get("update") or {}).get("rolled_back")}
    figures.update(
        installed=sorted(installed), rolled_back=sorted(rolled),
        failed_outside=sum(c >= 500 for d, r in results.items() if d not in cohort for c, _ in r),
        requests_outside=sum(len(r) for d, r in results.items() if d not in cohort),
        failed_inside=sum(c >= 500 for d, r in results.items() if d in cohort for c, _ in r),
        requests_inside=sum(len(r) for d, r in results.items() if d in cohort),
        v2_answers_outside=sum(v == 2 for d, r in results.items() if d not in cohort for _, v in r),
        versions_after=after, metrics=metrics, statuses=statuses, cohort_ids=sorted(cohort))
    return figures


def _check_rollout(f: dict) -> None:
    cohort = set(f["cohort_ids"])
    # compact, so pytest does not cut it: what each cohort device says about the release
    diag = {d: {"last_event": f["statuses"][d]["last_event"], "probation": f["statuses"][d]["probation"],
                "update": {k: f["statuses"][d]["update"].get(k) for k in ("rolled_back", "last_check")},
                "failed": f["failed_inside"], "requests": f["requests_inside"]} for d in cohort}
    diag = json.dumps(diag, default=str)  # a string: shown whole
    assert set(f["installed"]) == cohort, diag  # installed only on the cohort, all of it
    assert set(f["rolled_back"]) == cohort, diag  # rolled back on 100% of it
    assert f["failed_outside"] == 0 and f["v2_answers_outside"] == 0, f
    assert 0 < f["failed_inside"] < f["requests_inside"], f  # the triggers cut the failures short
    assert all(v == 1 for v in f["versions_after"].values()), f
    assert f["after_restart"] == {"version": 1, "check": "current"}, f
    for d in cohort:
        ev = f["statuses"][d]["last_event"]
        rolled_back = ev["outcome"] == "rolled-back" and ev["trigger"] == "error_rate" and ev["restored_version"] == 1
        assert rolled_back or (ev["outcome"] == "refused" and ev["check"] == "known-bad"), ev
        assert 'edgeward_rollbacks_total{trigger="error_rate"} 1.0' in f["metrics"][d]
    print({k: v for k, v in f.items() if k not in ("metrics", "statuses")})


def test_staged_rollout_small_fleet(api_env, tmp_path):
    """4 devices (25% = 1 device): the non-slow version of the fleet test."""
    _check_rollout(_rollout(api_env, tmp_path, 4))


@pytest.mark.slow
def test_staged_rollout_eight_devices(api_env, tmp_path):
    """8 device processes, a bad model to 25%: installed on the 2 in the cohort only,
    rolled back on both, 0 failed requests on the other 6."""
    _check_rollout(_rollout(api_env, tmp_path, 8))
