"""Sharded robustness audit on a local Ray cluster: 1 vs 2 workers, same shards, same result.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ray.py [--n 96] [--shard-points 12] [--profile thorough]

Each configuration runs in its own process (one Ray cluster per process): a local
cluster on 127.0.0.1 with ``--workers`` CPUs, workers warmed (imports done) before the
clock starts, then the digits demo audit (model + PyTorch source) on the same seed and
shard plan. Prints wall time per configuration, the speedup over 1 worker, the load
average before and after (the machine may be shared), per-shard timings, and checks
the two merged reports are equal. ``--json FILE`` writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ATTACKS = None  # the profile's default attacks


def one(args) -> dict:
    """Run one configuration in this process and print its JSON on stdout."""
    from hardening.demo import build_demo
    from hardening.executor import make_executor
    from hardening.robustness import run_robustness_audit

    demo = build_demo("digits", Path(args.demo))
    ex = make_executor("ray", workers=args.workers)
    ex.warm()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rep = run_robustness_audit([demo.model_path], demo.data_path, torch_source=demo.torch_path, profile=args.profile,
                               n=args.n, seed=0, executor=ex, shard_points=args.shard_points,
                               attacks=[a for a in args.attacks.split(",")] if args.attacks else None)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    ex.close()

    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("seconds", "execution", "queries")}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    import hashlib

    digest = hashlib.sha256(json.dumps(strip(rep.to_dict()), sort_keys=True).encode()).hexdigest()
    return {"workers": args.workers, "wall_s": round(wall, 2), "load_before": load0, "load_after": load1,
            "robust_accuracy": [e.robust_accuracy for e in rep.variants[0].eps], "result_digest": digest,
            "shards": rep.execution["shards"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--shard-points", type=int, default=12)
    ap.add_argument("--profile", default="thorough")
    ap.add_argument("--attacks", default="", help="comma-separated subset (default: the profile's)")
    ap.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--demo", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.workers is not None:
        print("RESULT " + json.dumps(one(args)))
        return
    demo = tempfile.mkdtemp(prefix="bench-ray-")
    runs = []
    for w in (1, 2):
        cmd = [sys.executable, __file__, "--workers", str(w), "--demo", demo, "--n", str(args.n),
               "--shard-points", str(args.shard_points), "--profile", args.profile, "--attacks", args.attacks]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]))
        r = runs[-1]
        print(f"{w} worker(s): {r['wall_s']:.1f} s wall, load avg {r['load_before'][0]:.2f} -> "
              f"{r['load_after'][0]:.2f}, robust {r['robust_accuracy']}")
    speed = runs[0]["wall_s"] / runs[1]["wall_s"]
    same = runs[0]["result_digest"] == runs[1]["result_digest"]
    secs = [s["seconds"] for s in runs[0]["shards"]]
    print(f"speedup 2 vs 1 worker: {speed:.2f}x (baseline: the same shards on a 1-CPU Ray cluster); "
          f"merged results equal: {same}")
    print(f"per-shard seconds on 1 worker: {[round(s, 1) for s in secs]} (sum {sum(secs):.1f}, max {max(secs):.1f})")
    print(f"cpus: {os.cpu_count()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "speedup": speed, "equal": same,
                                               "n": args.n, "shard_points": args.shard_points,
                                               "profile": args.profile}, indent=1))


if __name__ == "__main__":
    main()
