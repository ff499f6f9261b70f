"""Request body formats side by side: JSON vs application/x-npy, parse (server) and encode
(client) time per body, for the digits demo's 1x8x8 input and a 3x96x96 image.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_body_formats.py --repeats 50

Prints p50 per format and the ratio json/npy (baseline: npy) for each shape.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np

from api.body import parse_json_inputs, parse_npy


def _p50(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _npy(x: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, x)
    return bio.getvalue()


def _measure(x: np.ndarray, repeats: int) -> dict[str, tuple[int, float, float]]:
    """format -> (body bytes, parse p50 s, encode p50 s)."""
    jb, nb = json.dumps({"inputs": x.tolist()}).encode(), _npy(x)
    return {
        "json": (len(jb), _p50(lambda: parse_json_inputs(jb), repeats),
                 _p50(lambda: json.dumps({"inputs": x.tolist()}).encode(), repeats)),
        "npy": (len(nb), _p50(lambda: parse_npy(nb), repeats), _p50(lambda: _npy(x), repeats)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'input':<12} {'format':<5} {'bytes':>8} {'parse p50 ms':>13} {'encode p50 ms':>14}")
    for shape in [(1, 1, 8, 8), (1, 3, 96, 96)]:
        rows = _measure(rng.uniform(size=shape).astype(np.float32), args.repeats)
        tag = "x".join(map(str, shape[1:]))
        for fmt, (size, parse, enc) in rows.items():
            print(f"{tag:<12} {fmt:<5} {size:>8} {parse * 1e3:>13.3f} {enc * 1e3:>14.3f}")
        print(f"{tag:<12} ratio json/npy (baseline npy): parse {rows['json'][1] / rows['npy'][1]:.2f}x, "
              f"encode {rows['json'][2] / rows['npy'][2]:.2f}x")


if __name__ == "__main__":
    main()
