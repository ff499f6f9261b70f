"""Guard overhead and gate score of two checkouts side by side: the same benchmark, alternated.

Runs ``bench_guard_overhead.py --only target`` (this checkout's copy, which uses only public APIs) once per
round for each ``--tree NAME=PATH[,OOD_DIR]`` with ``PYTHONPATH=PATH``, in alternation, with
the same interpreter, model and inputs, and prints the median over rounds of: the bare
batch-1 inference, the target row (limit + fitted gate + policy) added p50 (wall and
thread CPU), its ratio to the bare inference, the fitted gate's score alone, and inside the
target's requests the gate (score + verdict) and every other guard stage.
``OOD_DIR`` is the tree's own ``fit-ood`` output (omitted: the benchmark fits the gate with
that tree's code).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_gate_ab.py \\
        --model-dir /tmp/gate/cache/mnv3 --tree main=/work/main,/tmp/gate/mnv3_det \\
        --tree branch=.,/tmp/gate15/mnv3_det --rounds 3 -n 3000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("bench_guard_overhead.py")
TARGET = "target: limit + fitted 5-detector gate"
GATE = "fitted 5-detector gate score (fused)"


def _run(path: str, ood: str | None, model_dir: str, n: int) -> dict[str, float]:
    cmd = [sys.executable, str(BENCH), "--model-dir", model_dir, "-n", str(n), "--json", "--only", "target"]
    if ood:
        cmd += ["--ood-dir", ood]
    env = {**os.environ, "PYTHONPATH": str(Path(path).resolve()), "OMP_NUM_THREADS": "1"}
    out = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
    row = next(r for r in out["end_to_end"] if r["variant"] == TARGET)
    return {"bare_p50_us": row["bare_p50_us"], "added_p50_us": row["added_p50_us"],
            "added_cpu_p50_us": row["added_cpu_p50_us"], "added_pct_of_bare": 100 * row["added_p50_us"] / row["bare_p50_us"],
            "gate_score_p50_us": out["components_p50_us"][GATE],
            "in_context_gate_us": out["components_p50_us"]["in context: fitted gate, score + verdict"],
            "in_context_other_stages_us": out["components_p50_us"]["in context: all guard stages but the gate"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="model.onnx + data.npz")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH[,OOD_DIR] (repeat; run in this order)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=3000, help="timed calls per variant and run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    trees = []
    for spec in args.tree:
        name, _, rest = spec.partition("=")
        path, _, ood = rest.partition(",")
        trees.append((name, path, ood or None))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in trees}
    for r in range(args.rounds):
        for name, path, ood in trees if r % 2 == 0 else trees[::-1]:  # alternate the order too
            runs[name].append(_run(path, ood, args.model_dir, args.n))
            print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    summary = {name: {k: round(statistics.median(x[k] for x in rs), 1) for k in rs[0]} for name, rs in runs.items()}
    if args.json:
        print(json.dumps({"model_dir": args.model_dir, "rounds": args.rounds, "median": summary, "runs": runs}, indent=2))
        return
    cols = list(next(iter(summary.values())))
    print("| tree | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in summary.items():
        print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
