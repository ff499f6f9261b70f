"""Cold start: plain onnxruntime load vs signed+encrypted bundle load.

Plain:  InferenceSession(path) + first inference.
Bundle: read + verify signature + decrypt/authenticate + admission checks
        + session (``OpenedBundle.open_session`` = ``admission.load_session``:
        skeleton bytes + large weights as in-place OrtValues) + first inference.
Both use the same thread settings and CPUExecutionProvider. Median over
repeats, alternating the two paths so drift hits both equally.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cold_start.py [--repeats 7] [--fresh-process]

Each row also reports the *mandated floor*: the steps issue #6 requires of every
load, in the order it requires them (Ed25519 verify before any decryption,
AES-256-GCM decrypt, SHA-256 against the signed manifest, onnx.checker full
check before onnxruntime sees the bytes), each timed alone on this model in the
same run. ``floor ratio`` = (plain + floor) / plain is the best ratio any loader
doing those steps could reach with zero glue.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from onnx import TensorProto, helper, numpy_helper

from runtime_guard.admission import AdmissionLimits, _checker_view, _parse, _skeleton, load_session
from runtime_guard.bundle import (
    build_bundle,
    generate_kek,
    generate_signing_keypair,
    load_kek,
    open_bundle,
    write_secret_file,
)
from runtime_guard.bundle.format import DEFAULT_CHUNK_SIZE, SIG_CONTEXT, Source, chunk_nonce, parse_header
from runtime_guard.bundle.keys import coerce_public_key


def gemm_model(dim: int, seed: int = 0) -> bytes:
    """x[N, dim] @ W[dim, dim] + B -> Softmax; ~4*dim^2 bytes of weights."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal((dim,)).astype(np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["z"]),
         helper.make_node("Softmax", ["z"], ["y"], axis=1)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, dim])], [w, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def plain(path: Path, x: np.ndarray, threads: int) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    sess.run(None, x)
    return time.perf_counter() - t0, time.process_time() - c0


def bundled(path: Path, x: np.ndarray, threads: int, pub, kek, parts: dict) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    opened = open_bundle(path, pub, kek)
    t2 = time.perf_counter()
    sess = load_session(opened.model_bytes, AdmissionLimits(), intra_op_threads=threads)  # = opened.open_session()
    t3 = time.perf_counter()
    sess.run(None, x)
    t4 = time.perf_counter()
    for k, v in (("verify+decrypt", t2 - t0), ("admission+session", t3 - t2),
                 ("first_run", t4 - t3)):
        parts.setdefault(k, []).append(v)
    return t4 - t0, time.process_time() - c0


def mandated_floor(model: bytes, bundle_path: Path, pub: bytes, repeats: int) -> dict[str, float]:
    """Median ms of each step #6 mandates, alone: what no loader can skip."""
    with Source(bundle_path) as src:
        header = parse_header(src)
    key = coerce_public_key(pub)
    aead, aad = AESGCM(os.urandom(32)), b"aad"
    n = max(1, -(-len(model) // DEFAULT_CHUNK_SIZE))
    chunks = [aead.encrypt(chunk_nonce(i, i == n - 1), model[i * DEFAULT_CHUNK_SIZE:(i + 1) * DEFAULT_CHUNK_SIZE], aad)
              for i in range(n)]
    skeleton, stripped = _skeleton(model, AdmissionLimits())
    view = _checker_view(skeleton, _parse(skeleton), stripped)  # what admission hands onnx.checker
    steps = {
        "ed25519": lambda: key.verify(header.signature, SIG_CONTEXT + header.signed),
        "aes-gcm": lambda: [aead.decrypt(chunk_nonce(i, i == n - 1), c, aad) for i, c in enumerate(chunks)],
        "sha256": lambda: hashlib.sha256(model).digest(),
        "checker": lambda: onnx.checker.check_model(view, full_check=True),
    }
    out = {}
    for k, fn in steps.items():
        ts = []
        for _ in range(max(repeats, 5)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[k] = 1e3 * statistics.median(ts)
    return out


def bench(name: str, dim: int, repeats: int, threads: int, workdir: Path, model: bytes | None = None,
          fresh: bool = False) -> dict:
    """``model`` overrides the generated Gemm model (e.g. the digits demo). ``fresh``: every
    measurement in a new process (see ``child``)."""
    model = gemm_model(dim) if model is None else model
    priv, pub = generate_signing_keypair()
    kek = generate_kek()
    onnx_path, bundle_path = workdir / f"{name}.onnx", workdir / f"{name}.ewb"
    onnx_path.write_bytes(model)
    blob, _ = build_bundle({"model": model}, {}, priv, kek, 1)
    bundle_path.write_bytes(blob)
    del blob
    inp = onnx.load_from_string(model).graph.input[0]
    name_in = inp.name
    shape = [1] + [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim[1:]]
    x = {name_in: np.ones(shape, np.float32)}
    p, b, parts = [], [], {}
    if fresh:
        # the job for the child processes: plain JSON + the KEK in a 0600 file (never pickle)
        job = workdir / f"{name}.job.json"
        kek_path = workdir / f"{name}.kek"
        write_secret_file(kek_path, kek)
        job.write_text(json.dumps({"onnx": str(onnx_path), "bundle": str(bundle_path), "pub": pub.decode(),
                                   "kek": str(kek_path), "input": name_in, "shape": shape, "threads": threads}))
        for _ in range(repeats):
            for kind, acc in (("plain", p), ("bundle", b)):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(job)],
                                     check=True, capture_output=True, text=True).stdout
                wall, cpu, prt = json.loads(out.strip().splitlines()[-1])
                acc.append((wall, cpu))
                for k, v in prt.items():
                    parts.setdefault(k, []).append(v)
    else:
        # warm-up (imports, page cache, allocator), not measured
        plain(onnx_path, x, threads)
        bundled(bundle_path, x, threads, pub, kek, {})
        for _ in range(repeats):
            gc.collect()
            p.append(plain(onnx_path, x, threads))
            gc.collect()
            b.append(bundled(bundle_path, x, threads, pub, kek, parts))
    med = lambda xs, i: 1e3 * statistics.median(v[i] for v in xs)  # noqa: E731
    res = {"name": name, "model_mb": len(model) / 1e6,
           "plain_ms": med(p, 0), "bundle_ms": med(b, 0),
           "plain_cpu_ms": med(p, 1), "bundle_cpu_ms": med(b, 1),
           "parts_ms": {k: 1e3 * statistics.median(v) for k, v in parts.items()}}
    res["ratio"] = res["bundle_ms"] / res["plain_ms"]
    res["cpu_ratio"] = res["bundle_cpu_ms"] / res["plain_cpu_ms"]
    res["floor_ms"] = mandated_floor(model, bundle_path, pub, repeats)
    res["floor_ratio"] = (res["plain_ms"] + sum(res["floor_ms"].values())) / res["plain_ms"]
    return res


def child(kind: str, job: Path) -> None:
    """One measurement in a fresh process: the first load of this model after the
    runtimes are initialised (a tiny model is loaded both ways first, so neither
    path pays onnxruntime's or OpenSSL's one-time set-up), on a fresh heap, so no
    memory freed by an earlier iteration is reused. Prints [wall, cpu, parts]."""
    spec = json.loads(job.read_text())
    onnx_path, bundle_path, pub, threads = spec["onnx"], spec["bundle"], spec["pub"].encode(), spec["threads"]
    kek = load_kek(file=spec["kek"])
    x = {spec["input"]: np.ones(spec["shape"], np.float32)}
    with tempfile.TemporaryDirectory() as d:
        tiny = gemm_model(8)
        priv2, pub2 = generate_signing_keypair()
        kek2 = generate_kek()
        (Path(d) / "t.onnx").write_bytes(tiny)
        (Path(d) / "t.ewb").write_bytes(build_bundle({"model": tiny}, {}, priv2, kek2, 1)[0])
        xt = {"x": np.ones((1, 8), np.float32)}
        plain(Path(d) / "t.onnx", xt, threads)
        bundled(Path(d) / "t.ewb", xt, threads, pub2, kek2, {})
    gc.collect()
    parts: dict = {}
    if kind == "plain":
        wall, cpu = plain(Path(onnx_path), x, threads)
    else:
        wall, cpu = bundled(Path(bundle_path), x, threads, pub, kek, parts)
    print(json.dumps([wall, cpu, {k: v[0] for k, v in parts.items()}]))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big-dim", type=int, default=3584)  # 3584^2 * 4 B = ~51 MB
    ap.add_argument("--small-dim", type=int, default=256)  # ~0.26 MB
    ap.add_argument("--demo-model", type=Path, default=None,
                    help="also measure this ONNX model (e.g. /tmp/demo/digits/model.onnx)")
    ap.add_argument("--fresh-process", action="store_true",
                    help="measure every load in a new process (fresh heap; runtimes initialised)")
    args = ap.parse_args()
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, threads={args.threads}, "
          f"repeats={args.repeats}, cpus={os.cpu_count()}, load {_load()}"
          + (", one process per load" if args.fresh_process else ""))
    with tempfile.TemporaryDirectory() as d:
        cases = [("small", args.small_dim, None), ("large", args.big_dim, None)]
        if args.demo_model is not None:
            cases.insert(0, ("demo", 0, args.demo_model.read_bytes()))
        for name, dim, model in cases:
            r = bench(name, dim, args.repeats, args.threads, Path(d), model, args.fresh_process)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts_ms"].items())
            print(f"{r['name']:5s} {r['model_mb']:6.2f} MB | wall: plain {r['plain_ms']:7.1f} ms  "
                  f"bundle {r['bundle_ms']:7.1f} ms  ratio {r['ratio']:.2f}x | cpu: plain "
                  f"{r['plain_cpu_ms']:7.1f} ms  bundle {r['bundle_cpu_ms']:7.1f} ms  ratio "
                  f"{r['cpu_ratio']:.2f}x | bundle wall parts: {parts}")
            floor = ", ".join(f"{k} {v:.2f}" for k, v in r["floor_ms"].items())
            print(f"{'':5s} {'':6s}    | mandated floor {sum(r['floor_ms'].values()):.2f} ms ({floor}) "
                  f"-> floor ratio {r['floor_ratio']:.2f}x")
    print(f"load at end: {_load()}")


def _load() -> str:
    """1/5/15-minute load average: wall figures are only as good as the machine is quiet."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
