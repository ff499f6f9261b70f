"""Do the runtime's batch-1 fast paths pay? Sanitizer, softmax and the anomaly gate's
score (six detectors: msp, energy, Mahalanobis and kNN on 64 features, input kNN with a
500-row bank and a 20-component PCA on the input) at batch 1, on the digits demo shape
(1x8x8, 10 classes) and a MobileNet-class shape (3x96x96, 1000 classes).

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

from runtime_guard.anomaly import FORMAT, AnomalyScorer
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


def _gate(d_in: int, rng: np.random.Generator) -> AnomalyScorer:
    """Six detectors with random (finite) parameters of a fitted set's sizes."""
    import io

    d_f, q = 64, np.linalg.qr(rng.standard_normal((d_in, 20)))[0].T
    arrays = {"maha__means": rng.standard_normal((10, d_f)), "maha__precision": np.eye(d_f),
              "knn__bank": rng.standard_normal((500, d_f)), "iknn__bank": rng.random((500, d_in)),
              "pca__mean": rng.random(d_in), "pca__components": q}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    norm = {"mean": 0.0, "std": 1.0}
    dets = [{"name": "msp", "kind": "msp", "view": "logits", "norm": norm},
            {"name": "energy", "kind": "energy", "view": "logits", "norm": norm},
            {"name": "maha", "kind": "mahalanobis", "view": "features", "norm": norm},
            {"name": "knn", "kind": "knn", "view": "features", "norm": norm},
            {"name": "iknn", "kind": "input_knn", "view": "input", "norm": norm},
            {"name": "pca", "kind": "pca", "view": "input", "norm": norm}]
    meta = {"format": FORMAT, "threshold": 1.0, "detectors": dets,
            "fusion": {"rule": "mean_z", "members": [d["name"] for d in dets]}}  # a rule both versions read
    return AnomalyScorer.from_bytes(buf.getvalue(), meta)


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
        gate = _gate(int(np.prod(shape)), rng)
        feats = rng.standard_normal((1, 64)).astype(np.float32)
        out[name] = {"sanitizer": _us(lambda san=san, x=x: san(x), args.n),
                     "softmax": _us(lambda lg=logits: softmax(lg), args.n),
                     "gate score (6 detectors)": _us(lambda g=gate, x=x, lg=logits, f=feats: g.score(x, lg, f),
                                                     max(50, args.n // 20))}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, row in out.items():
        print(name, row)


if __name__ == "__main__":
    main()
