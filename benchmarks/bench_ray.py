"""Sharded robustness audit on a local Ray cluster: 1 vs 2 workers, same shards, same result.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ray.py [--n 96] [--shard-points 12] [--profile thorough]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_ray.py --full [--profile quick]

Each configuration runs in its own process (one Ray cluster per process): a local
cluster on 127.0.0.1 with ``--workers`` CPUs, workers warmed (imports done) before the
clock starts, then the digits demo audit (model + PyTorch source) on the same seed and
shard plan. Prints wall time per configuration, the speedup over 1 worker, the load
average before and after (the machine may be shared), per-shard timings, and checks
the two merged reports are equal. ``--json FILE`` writes everything.

``--full``: the whole review instead, exactly as a user runs it: ``edgeward audit MODEL
--data D --torch-source S --out O --executor ray --workers W`` of the digits demo, once per
worker count, timed from outside (so Ray start-up and first imports are included); it
prints both wall times, whether the figures (robust accuracy, extraction, OOD) are equal,
and the 2-worker run's ``provenance.stages``.
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


def figures(report: dict) -> dict:
    """What the review measured, without timings, query counts or where it ran."""
    keep = ("clean_accuracy", "robust_accuracy", "extraction", "ood", "guarded_robust_accuracy")
    return {n: {k: v.get(k) for k in keep} for n, v in report["summary"]["variants"].items()}


def full(args) -> None:
    from hardening.demo import build_demo

    work = Path(tempfile.mkdtemp(prefix="bench-ray-full-"))
    demo = build_demo("digits", work / "demo")
    runs = []
    for w in (1, 2):
        out = work / f"review-{w}"
        cmd = [sys.executable, "-m", "hardening", "audit", str(demo.model_path), "--data", str(demo.data_path),
               "--torch-source", str(demo.torch_path), "--out", str(out), "--profile", args.profile,
               "--executor", "ray", "--workers", str(w), "--json",
               *(["--kinds", args.kinds] if args.kinds else []), *(["--areas", args.areas] if args.areas else [])]
        if args.areas:
            cmd.append("--allow-skipped")
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, capture_output=True, text=True).returncode
        wall = time.perf_counter() - t0
        if rc not in (0, 1):
            raise SystemExit(f"edgeward audit exited {rc}: {' '.join(cmd)}")
        rep = json.loads((out / "report.json").read_text())
        runs.append({"workers": w, "wall_s": round(wall, 2), "load_before": load0, "load_after": os.getloadavg(),
                     "figures": figures(rep), "stages": rep["provenance"]["stages"],
                     "shards": rep["provenance"]["ood_shards"]
                     + ((rep["results"]["robustness"] or {}).get("execution") or {}).get("shards", [])})
        print(f"{w} worker(s): {wall:.1f} s wall (edgeward audit --executor ray --workers {w}), load avg "
              f"{load0[0]:.2f} -> {runs[-1]['load_after'][0]:.2f}")
    same = runs[0]["figures"] == runs[1]["figures"]
    print(f"speedup 2 vs 1 worker: {runs[0]['wall_s'] / runs[1]['wall_s']:.2f}x (baseline: the same review on a "
          f"1-CPU Ray cluster); figures equal: {same}")
    for st in runs[1]["stages"]:
        print(f"  {st['stage']:<11} {st['variant'] or 'all':<20} {st['seconds']:8.1f} s  {st['peak_rss_mb']} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": "full", "runs": runs, "equal": same, "profile": args.profile},
                                              indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--shard-points", type=int, default=12)
    ap.add_argument("--profile", default="thorough")
    ap.add_argument("--attacks", default="", help="comma-separated subset (default: the profile's)")
    ap.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--demo", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--full", action="store_true", help="time the whole `edgeward audit --executor ray` review")
    ap.add_argument("--kinds", default="", help="--full: compression kinds (default: all), e.g. float for a smoke run")
    ap.add_argument("--areas", default="", help="--full: areas (default: all), e.g. ood for a smoke run")
    args = ap.parse_args()
    if args.full:
        if args.profile == "thorough" and "--profile" not in sys.argv:
            args.profile = "quick"  # the review's own default
        full(args)
        return
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
