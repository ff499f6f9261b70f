"""Query attribution side by side: nearest candidates in a random projection, then exact
distances (``attacks.estimators.QueryCounter``) vs the brute-force nearest reference (one matrix
product of every queried row with all n inputs, the previous implementation), for the
digits demo's 64 features and a 3x96x96 image, at n = 50, 200 and 800 audit points.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_query_attribution.py --repeats 5

Each call attributes one batch of n perturbed, shuffled rows (what one attack step
queries), on one BLAS thread as in the audit. Prints the time per call of both, the ratio brute/projection (baseline: projection) and
whether both attribute every row to the same input.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from attacks.estimators import QueryCounter


def brute(ref: np.ndarray, q: np.ndarray) -> np.ndarray:
    d = (q * q).sum(1)[:, None] - 2.0 * q @ ref.T + (ref * ref).sum(1)[None, :]
    return np.bincount(d.argmin(1), minlength=len(ref))


def _time(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threadpool_limits(1)  # what the audit's attacks run with
    rng = np.random.default_rng(0)
    print(f"{'dim':>6} {'n':>4} {'proj ms':>8} {'brute ms':>9} {'brute/proj':>10} same")
    for dim in (64, 3 * 96 * 96):
        for n in (50, 200, 800):
            ref = rng.random((n, dim), dtype=np.float32)
            q = np.clip(ref[rng.permutation(n)] + rng.uniform(-0.1, 0.1, (n, dim)).astype(np.float32), 0, 1)
            c = QueryCounter()
            c.set_reference(ref)
            tree = _time(lambda c=c, q=q: c.record(q), args.repeats)
            c.set_reference(ref)
            c.record(q)
            base = _time(lambda ref=ref, q=q: brute(ref, q), args.repeats)
            same = bool((c.per_example == brute(ref, q)).all())
            print(f"{dim:>6} {n:>4} {tree * 1e3:>8.2f} {base * 1e3:>9.2f} {base / tree:>9.1f}x {same}")


if __name__ == "__main__":
    main()
