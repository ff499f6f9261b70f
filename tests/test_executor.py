"""Sharded robustness audits: worst-case merge, per-shard seeds, checkpoints and --resume.

The in-process executor runs the same shards as Ray; these tests need no cluster
(tests/test_executor_ray.py starts one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hardening.executor import InProcessExecutor, Shard, ShardStore, run_shards
from hardening.executor.base import parse_executor
from hardening.robustness import run_robustness_audit
from hardening.robustness.shards import merge_points, point_ranges, shard_seed

# HopSkipJump is left out: its query counts and boundary distances vary between two
# identical runs in one process (onnxruntime's float reductions at the decision boundary).
ATTACKS = ["fgsm", "pgd", "deepfool", "square"]


def comparable(report) -> dict:
    """The report without wall-clock times, query counts (per-shard set_reference) or provenance."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("seconds", "execution")}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o
    return strip(report.to_dict())


def audit(demo, **kw):
    args = dict(torch_source=demo.torch_path, eps=[0.05, 0.15], n=30, seed=5, attacks=ATTACKS, shard_points=10)
    args.update(kw)
    return run_robustness_audit([demo.model_path], demo.data_path, **args)


def _part(start, stop, broken_eps, robust_after, broken_by_attack):
    n = stop - start
    meta = {"start": start, "stop": stop,
            "eps": [{"eps": 0.1, "robust": int(np.isnan(broken_eps).sum()), "n": n,
                     "robust_accuracy": float(np.isnan(broken_eps).mean()), "ci_low": 0, "ci_high": 1,
                     "robust_after_family": {"white-box": robust_after / n}, "broken_by": broken_by_attack}],
            "runs": [{"attack": "pgd", "family": "white-box", "eps": 0.1, "attacked": n, "broken": n - robust_after,
                      "queries": 3 * n, "surrogate_queries": n, "seconds": 0.5, "skipped": None}],
            "broken_by": [None if np.isnan(b) else "pgd" for b in broken_eps]}
    arrays = {"clean_pred": np.zeros(n, int), "correct": np.ones(n, bool), "broken_eps": broken_eps,
              "break_norm": np.where(np.isnan(broken_eps), np.nan, 0.05), "min_dist": np.full(n, 0.07),
              "queries": np.full(n, 3), "surrogate_queries": np.ones(n, int)}
    return meta, arrays


def test_merge_is_the_worst_case_over_shards_and_covers_each_point_once():
    a = _part(0, 3, np.array([np.nan, 0.1, np.nan]), 2, {"pgd": 1})
    b = _part(3, 5, np.array([0.1, 0.1]), 0, {"pgd": 2})
    out = merge_points([b, a], 5)  # arrival order does not matter
    assert out.eps[0].robust == 2 and out.eps[0].n == 5 and out.eps[0].robust_accuracy == 0.4
    assert out.eps[0].robust_after_family == {"white-box": 0.4} and out.eps[0].broken_by == {"pgd": 3}
    assert out.robust.tolist() == [True, False, True, False, False]
    assert out.broken_by == [None, "pgd", None, "pgd", "pgd"]
    r = out.runs[0]
    assert (r.attacked, r.broken, r.queries, r.seconds) == (5, 3, 15, 1.0)
    with pytest.raises(ValueError, match="exactly once"):
        merge_points([a, a, b], 5)
    with pytest.raises(ValueError, match="exactly once"):
        merge_points([a], 5)


def test_point_ranges_and_seeds():
    assert point_ranges(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert point_ranges(25, None) == [(0, 25)]
    assert shard_seed(7, 0) == 7 and len({shard_seed(7, k) for k in range(5)}) == 5


def test_executor_spelling():
    assert parse_executor(None) == ("in-process", None)
    assert parse_executor("ray") == ("ray", None)
    assert parse_executor("ray://127.0.0.1:10001") == ("ray", "ray://127.0.0.1:10001")
    for bad in ("dask", "ray://nohost", "ray://h:port"):
        with pytest.raises(Exception, match="executor"):
            parse_executor(bad)


def test_sharded_audit_is_repeatable_and_a_single_shard_is_the_unsharded_audit(digits_demo):
    one = audit(digits_demo, shard_points=None)
    assert comparable(one) == comparable(audit(digits_demo, shard_points=30))  # one shard: the plain seed
    a, b = audit(digits_demo), audit(digits_demo, executor=InProcessExecutor())
    assert comparable(a) == comparable(b)
    v = a.variants[0]
    assert len(v.examples) == 30 and [e.index for e in v.examples] == [e.index for e in one.variants[0].examples]
    shards = a.execution["shards"]
    assert [s["label"] for s in shards] == ["model points 0:10", "model points 10:20", "model points 20:30",
                                            "model self-checks"]
    assert all(s["seconds"] > 0 and not s["resumed"] for s in shards)
    # every point counted once in the merged figure, the self-check's long-run breaks included
    robust = [e for e in v.examples if e.correct and e.broken_at_eps is None]
    assert len(robust) == v.eps[-1].robust
    assert sum(r.attacked for r in v.attacks if r.eps == 0.05 and r.attack == "fgsm") == sum(
        e.correct for e in v.examples)


def test_resume_reads_finished_shards_back_and_redoes_only_the_rest(digits_demo, tmp_path):
    full = audit(digits_demo, checkpoint_dir=tmp_path)
    store = ShardStore(tmp_path)
    ids = store.finished()
    assert len(ids) == 4
    (store.dir / f"{ids[0]}.npz").unlink()  # as if the driver died before this shard was saved
    again = audit(digits_demo, checkpoint_dir=tmp_path, resume=True)
    assert again.execution["resumed"] == 3
    redone = [s for s in again.execution["shards"] if not s["resumed"]]
    assert [s["id"] for s in redone] == [ids[0]]
    assert comparable(again) == comparable(full)
    # other settings are other shards: nothing stale is reused
    other = audit(digits_demo, checkpoint_dir=tmp_path, resume=True, seed=6)
    assert other.execution["resumed"] == 0


def test_checkpoints_never_unpickle(tmp_path):
    store = ShardStore(tmp_path)
    s = Shard("robustness-points", "x", {"a": 1}, {"x": np.zeros(2)})
    store.save(s.id, {"ok": 1}, {"v": np.arange(3)}, {"seconds": 0.1})
    assert store.load(s.id)[1]["v"].tolist() == [0, 1, 2]
    np.savez(store.dir / f"{s.id}.npz", v=np.array([{"evil": 1}], dtype=object))  # needs pickle to read
    with pytest.raises(Exception, match="unreadable shard checkpoint"):
        store.load(s.id)
    with pytest.raises(Exception, match="unreadable shard checkpoint"):
        run_shards(InProcessExecutor(), [s], store, resume=True)


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "hardening", *args], capture_output=True, text=True,
                          env=env or os.environ, timeout=300, **kw)


def test_executor_ray_without_ray_is_one_line_exit_2(digits_demo, tmp_path):
    fake = tmp_path / "no_ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = _cli("audit", "robustness", str(digits_demo.model_path), "--data", str(digits_demo.data_path),
               "--executor", "ray", env=env)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "edgeward[ray]" in lines[0], res.stderr
    from typer.testing import CliRunner

    from hardening.cli import app

    base = ["audit", "robustness", str(digits_demo.model_path), "--data", str(digits_demo.data_path)]
    res = CliRunner().invoke(app, [*base, "--resume"])
    assert res.exit_code == 2 and "--resume needs --out" in res.output
    res = CliRunner().invoke(app, [*base, "--executor", "dask"])
    assert res.exit_code == 2 and "unknown --executor" in res.output
    res = CliRunner().invoke(app, ["audit", "extraction", str(digits_demo.model_path), "--data",
                                   str(digits_demo.data_path), "--resume"])
    assert res.exit_code == 2 and "--resume needs --out" in res.output


@pytest.mark.slow
def test_killed_driver_resumes_with_only_unfinished_shards(digits_demo, tmp_path):
    args = ["audit", "robustness", str(digits_demo.model_path), "--data", str(digits_demo.data_path),
            "--torch-source", str(digits_demo.torch_path), "--n", "40", "--eps", "0.05,0.15", "--seed", "5",
            "--attacks", ",".join(ATTACKS), "--shard-points", "10", "--out", str(tmp_path), "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "hardening", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = ShardStore(tmp_path)
    deadline = time.monotonic() + 240
    while len(store.finished()) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = set(store.finished())
    assert 2 <= len(before) < 5, "the driver finished before it could be killed"
    res = _cli(*args, "--resume")
    assert res.returncode == 0, res.stderr
    ex = json.loads(res.stdout)["execution"]
    assert {s["id"] for s in ex["shards"] if s["resumed"]} == before
    assert len(ex["shards"]) == 5 and ex["resumed"] == len(before)
    assert set(store.finished()) == {s["id"] for s in ex["shards"]}
    ref = audit(digits_demo, n=40)
    assert comparable_dict(json.loads(res.stdout)) == comparable_dict(json.loads(json.dumps(ref.to_dict())))


def comparable_dict(d):
    if isinstance(d, dict):
        return {k: comparable_dict(v) for k, v in d.items() if k not in ("seconds", "execution")}
    if isinstance(d, list):
        return [comparable_dict(v) for v in d]
    return d


def test_checkpoint_folder_layout_is_plain_files(tmp_path):
    store = ShardStore(tmp_path)
    s = Shard("robustness-points", "x", {"a": 1})
    store.save(s.id, {"b": 2}, {}, {})
    assert sorted(p.suffix for p in Path(store.dir).iterdir()) == [".json", ".npz"]
    assert json.loads((store.dir / f"{s.id}.json").read_text())["meta"] == {"b": 2}


def extraction(demo, **kw):
    from hardening.extraction_audit import run_extraction_audit

    return run_extraction_audit(demo.model_path, demo.data_path, torch_source=demo.torch_path, budgets=[50, 150],
                                scenarios=["in_dist", "noise"], policies=["bare", "label_only", "rounded"],
                                attacks=["copycat"], train_steps=60, seed=2, **kw)


def runs_of(report) -> list[dict]:
    return [{k: v for k, v in r.__dict__.items() if k != "seconds"} for r in report.runs]


def test_extraction_cells_merge_to_the_unsharded_grid_and_resume(digits_demo, tmp_path):
    plain = extraction(digits_demo)
    sharded = extraction(digits_demo, executor=InProcessExecutor(), checkpoint_dir=tmp_path)
    assert runs_of(sharded) == runs_of(plain)
    assert [c.fidelity for c in sharded.curves] == [c.fidelity for c in plain.curves]
    assert any(r.reused_from for r in plain.runs)  # identical answers still share one thief inside a cell
    store = ShardStore(tmp_path)
    assert len(store.finished()) == 4  # 2 scenarios x 1 attack x 2 budgets
    (store.dir / f"{store.finished()[0]}.json").unlink()
    again = extraction(digits_demo, checkpoint_dir=tmp_path, resume=True)
    assert runs_of(again) == runs_of(plain) and len(store.finished()) == 4
