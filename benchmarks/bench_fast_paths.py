"""Do the runtime's batch-1 fast paths pay? Sanitizer, softmax and a whole guarded
predict at batch 1, on the digits demo shape (1x8x8, 10 classes) and a MobileNet-class
shape (3x96x96, 1000 classes).

Run the same script against two trees to compare code versions, e.g.::

    PYTHONPATH=/work/main .venv/bin/python benchmarks/bench_fast_paths.py   # before
    PYTHONPATH=. .venv/bin/python benchmarks/bench_fast_paths.py            # after

Prints p50 microseconds per call (median of 5 blocks).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from runtime_guard.config import InputSchema
from runtime_guard.output_policy import softmax
from runtime_guard.sanitizer import Sanitizer

SHAPES = {"demo 1x8x8 / 10 classes": ((1, 8, 8), 10), "mobilenet-class 3x96x96 / 1000 classes": ((3, 96, 96), 1000)}


def _us(fn, n: int) -> float:
    for _ in range(200):
        fn()
    blocks = []
    for _ in range(5):
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        blocks.append((time.perf_counter_ns() - t) / n / 1e3)
    return round(float(np.median(blocks)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    out = {}
    for name, (shape, classes) in SHAPES.items():
        san = Sanitizer(InputSchema(value_range=(0.0, 1.0)), list(shape))
        x = rng.random((1, *shape)).astype(np.float32)
        logits = (rng.standard_normal((1, classes)) * 3).astype(np.float32)
        out[name] = {"sanitizer": _us(lambda san=san, x=x: san(x), args.n),
                     "softmax": _us(lambda lg=logits: softmax(lg), args.n)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, row in out.items():
        print(name, row)


if __name__ == "__main__":
    main()
