"""A real Ray cluster on 127.0.0.1: a head node started by ``ray start`` in a subprocess
(two worker processes, no dashboard, no usage stats), joined through ``ray://`` like a remote
cluster. The merged audit must equal the in-process one on the same seeds, and a worker
killed mid-shard must cost neither a point nor a double count."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hardening.executor.ray_backend import QUIET_ENV

for _k, _v in QUIET_ENV.items():  # before ray is imported: it reads them at import
    os.environ.setdefault(_k, _v)
ray = pytest.importorskip("ray")

from hardening.executor import make_executor  # noqa: E402

from test_executor import audit, comparable  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """``ray start --head`` on loopback; yields the ``ray://`` address; stopped by its own pid."""
    tmp = tempfile.mkdtemp(prefix="ewray")  # short: Ray's unix sockets live under it
    gcs, client = _free_port(), _free_port()
    env = {**os.environ, **QUIET_ENV}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--ray-client-server-port", str(client), "--num-cpus", "2", "--include-dashboard", "false",
         "--disable-usage-stats", "--temp-dir", tmp],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", client), timeout=1).close()
            break
        except OSError:
            if head.poll() is not None:
                pytest.fail("ray start --head exited")
            time.sleep(0.5)
    else:
        head.kill()
        pytest.fail("Ray client port never opened")
    yield f"ray://127.0.0.1:{client}"
    if ray.is_initialized():
        ray.shutdown()
    _stop_group(head)
    shutil.rmtree(tmp, ignore_errors=True)


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL the cluster's process group: ``ray start --block`` takes ~33 s
    to stop gracefully, and a test cluster has nothing to save."""
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(3)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)


@pytest.fixture(scope="session")
def executor(ray_cluster):
    """One Ray Client connection for the session (connecting costs seconds)."""
    ex = make_executor(ray_cluster)
    yield ex
    ex.close()


def test_cluster_is_loopback_only(executor):
    nodes = ray.nodes()
    assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
    assert executor.workers() == 2


def test_ray_merged_robustness_equals_in_process(executor, digits_demo):
    local = audit(digits_demo)
    remote = audit(digits_demo, executor=executor)
    assert comparable(remote) == comparable(local)
    ex = remote.execution
    assert ex["executor"] == "ray" and ex["workers"] == 2 and len(ex["shards"]) == 4
    assert len({s["pid"] for s in ex["shards"]}) >= 1 and all(s["seconds"] > 0 for s in ex["shards"])


def _shard_workers() -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::run_shard"):
            out.append(p)
    return out


@pytest.mark.slow
def test_killed_worker_shard_is_retried_and_counted_once(executor, digits_demo):
    local = audit(digits_demo, n=40)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = _shard_workers()
            if busy:
                time.sleep(1.0)  # mid-shard, not at its start
                busy = _shard_workers()
                if busy:
                    killed.append(busy[0].pid)
                    busy[0].send_signal(signal.SIGKILL)
                    return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    remote = audit(digits_demo, n=40, executor=executor)
    t.join()
    assert killed, "no worker was busy to kill"
    assert killed[0] not in {s["pid"] for s in remote.execution["shards"]}
    assert len(remote.execution["shards"]) == 5
    assert comparable(remote) == comparable(local)  # no lost and no double-counted point
    assert len(remote.variants[0].examples) == 40


def test_ray_merged_extraction_equals_in_process(executor, digits_demo):
    from test_executor import extraction, runs_of

    local = extraction(digits_demo)
    remote = extraction(digits_demo, executor=executor)
    assert runs_of(remote) == runs_of(local)
    assert [c.queries_to_90 for c in remote.curves] == [c.queries_to_90 for c in local.curves]


def _ood_review(demo, out, executor=None, areas=("ood",)):
    from hardening.report import Policy, run_full_audit

    p = Policy()
    p.robustness.n = 8
    p.extraction.budget = p.extraction.min_queries_to_steal = 100
    return run_full_audit(demo.model_path, demo.data_path, out, torch_source=demo.torch_path, kinds=("float",),
                          areas=areas, policy=p, sizes={"ood_synthetic": 50, "extraction_budgets": (50,)},
                          allow_skipped=True, executor=executor).report


def _extraction_runs(rep: dict) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in rep["results"]["extraction"]["variants"]["float"]["runs"]]


def _ood_figures(rep: dict) -> dict:
    return {n: {k: v[k] for k in ("alpha", "threshold", "n_id", "id_frr", "metrics")}
            for n, v in rep["results"]["ood"]["variants"].items()}


def test_ray_full_review_extraction_and_ood_shards_equal_in_process(executor, digits_demo, tmp_path):
    local = _ood_review(digits_demo, tmp_path / "local", areas=("extraction", "ood"))
    remote = _ood_review(digits_demo, tmp_path / "ray", executor, areas=("extraction", "ood"))
    assert _ood_figures(remote) == _ood_figures(local)
    assert _extraction_runs(remote) == _extraction_runs(local) and len(_extraction_runs(local)) == 2  # budgets 50, 100
    shards = remote["provenance"]["ood_shards"]
    assert remote["provenance"]["executor"] == {"name": "ray", "workers": 2, "resume": False}
    assert len(shards) == len(local["provenance"]["ood_shards"]) and all(s["node"] for s in shards)
    assert all(s["peak_rss_mb"] > 50 for s in shards)  # measured in the Ray worker that ran the shard


@pytest.fixture
def two_node_cluster(tmp_path):
    """Head + one more node, both on 127.0.0.1 (tests/ray_two_nodes.py); stopped by its own pid."""
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="ewray2")
    script = Path(__file__).with_name("ray_two_nodes.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), tmp], env={**os.environ, **QUIET_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("READY"):
        proc.kill()
        pytest.fail(f"two-node cluster did not start: {line!r}")
    yield f"ray://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_two_node_cluster_on_loopback_runs_the_full_review_cli(two_node_cluster, digits_demo, tmp_path):
    """``edgeward audit --executor ray://...`` on two Ray nodes: shards run on both, and the OOD
    figures equal the in-process review's. The CLI runs in its own process (one Ray Client
    connection per process; this one holds the session cluster's)."""
    import json

    policy = tmp_path / "p.toml"
    policy.write_text("[robustness]\nn = 8\n")
    args = [sys.executable, "-m", "hardening", "audit", str(digits_demo.model_path), "--data",
            str(digits_demo.data_path), "--torch-source", str(digits_demo.torch_path), "--kinds", "float",
            "--areas", "ood", "--policy", str(policy), "--allow-skipped", "--json"]
    ray_run = subprocess.run([*args, "--out", str(tmp_path / "ray"), "--executor", two_node_cluster],
                             capture_output=True, text=True, timeout=600, env={**os.environ, **QUIET_ENV})
    assert ray_run.returncode in (0, 1), ray_run.stderr[-2000:]
    local_run = subprocess.run([*args, "--out", str(tmp_path / "local")], capture_output=True, text=True, timeout=600)
    assert local_run.returncode in (0, 1), local_run.stderr[-2000:]
    remote = json.loads((tmp_path / "ray" / "report.json").read_text())
    local = json.loads((tmp_path / "local" / "report.json").read_text())
    assert remote["provenance"]["executor"]["workers"] == 2
    nodes = {s["node"] for s in remote["provenance"]["ood_shards"]}
    assert len(nodes) == 2, "every shard ran on one node"
    assert _ood_figures(remote) == _ood_figures(local)
