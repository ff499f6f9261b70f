"""Peak memory of a ~200 MB model: packaged, verified and loaded through the guarded loader,
against a plain ``onnxruntime.InferenceSession(path)`` of the same file (the baseline).

Every row runs in its own fresh child process, all in one run, side by side. A child
imports everything first, takes its resident set as the base, resets the kernel's
high-water mark (``/proc/self/clear_refs`` = 5) and then does exactly one thing; it
reports the peak added (VmHWM - base), what stays resident afterwards (VmRSS - base) and
the wall time. One onnxruntime thread everywhere.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_bundle_memory.py --out /tmp/bundle-mem

Rows: ``plain_path`` (baseline) InferenceSession on the file; ``plain_bytes``
InferenceSession on the file's bytes (what handing the plaintext over as bytes would
cost); ``write_bundle`` sign + encrypt (publisher side); ``verify_bundle`` (signature,
decryption, digests, admission; no session); ``in_memory_load`` decrypt, then
``admission.load_session`` on the plaintext (onnxruntime copies the weights while the
plaintext lives); ``guarded_load`` ``GuardedModel.load`` (decrypt, admit, free the
plaintext, onnxruntime streams a second digest-checked decryption; smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r'''
import json, os, sys, time
import numpy as np
import onnxruntime as ort
from runtime_guard.admission import load_session
from runtime_guard.bundle import load_kek, open_bundle, verify_bundle, write_bundle
from runtime_guard.guard import GuardedModel

def status(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) / 1024

mode, work = sys.argv[1], sys.argv[2]
model, bundle = os.path.join(work, "big.onnx"), os.path.join(work, "big.ewb")
pub, kek = os.path.join(work, "signing.pub.pem"), os.path.join(work, "kek.key")
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t0 = time.perf_counter()
so = ort.SessionOptions()
so.intra_op_num_threads = so.inter_op_num_threads = 1
if mode == "plain_path":
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
elif mode == "plain_bytes":
    with open(model, "rb") as f:
        data = f.read()
    s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    del data
elif mode == "write_bundle":
    with open(model, "rb") as f:
        data = f.read()
    with open(os.path.join(work, "signing.pem"), "rb") as f:
        priv = f.read()
    write_bundle(bundle, {"model": data}, {}, priv, load_kek(kek), 1)
    del data
    s = None
elif mode == "verify_bundle":
    with open(pub, "rb") as f:
        summary = verify_bundle(bundle, f.read(), load_kek(kek))
    s = None
elif mode == "in_memory_load":
    with open(pub, "rb") as f:
        opened = open_bundle(bundle, f.read(), load_kek(kek))
    s = load_session(opened.take_model())
elif mode == "guarded_load":
    with open(pub, "rb") as f:
        guard = GuardedModel.load(bundle, f.read(), load_kek(kek))
    s = guard.session
if s is not None:  # one inference, so lazily allocated state is counted too
    i = s.get_inputs()[0]
    x = np.zeros([1] + [d if isinstance(d, int) else 1 for d in i.shape[1:]], np.float32)
    s.run(None, {i.name: x})
print(json.dumps({"mode": mode, "wall_s": time.perf_counter() - t0, "base_mb": base,
                  "peak_added_mb": status("VmHWM") - base, "resident_after_mb": status("VmRSS") - base}))
'''


def make_model(path: Path, width: int, layers: int) -> int:
    """Gemm layers with ``width x width`` float32 weights, plus a small MatMul head."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width), dtype=np.float32) * (1.0 / width ** 0.5)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}")]
        nodes += [helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]),
                  helper.make_node("Relu", [f"g{i}"], [f"h{i}"])]
        prev = f"h{i}"
    inits.append(numpy_helper.from_array(rng.standard_normal((width, 10), dtype=np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [prev, "head"], ["logits"]))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path.stat().st_size


def run_child(mode: str, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(work)], env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MODES = ("plain_path", "plain_bytes", "write_bundle", "verify_bundle", "in_memory_load", "guarded_load")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/bundle-mem"))
    ap.add_argument("--width", type=int, default=3600, help="Gemm width (3600: 51.8 MB per layer)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="every mode once per round, interleaved")
    args = ap.parse_args()
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    size = make_model(work / "big.onnx", args.width, args.layers)
    from runtime_guard.bundle import generate_kek, generate_signing_keypair, write_secret_file

    for old in ("signing.pem", "kek.key"):
        (work / old).unlink(missing_ok=True)
    priv, pub = generate_signing_keypair()
    write_secret_file(work / "signing.pem", priv)
    (work / "signing.pub.pem").write_bytes(pub)
    write_secret_file(work / "kek.key", generate_kek())
    load0 = os.getloadavg()[0]
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:  # write_bundle before the readers: each round reads a fresh bundle
            rows[mode].append(run_child(mode, work))
    load1 = os.getloadavg()[0]
    base = min(r["peak_added_mb"] for r in rows["plain_path"])
    lines = [f"Model: {size / 1e6:.1f} MB ONNX ({args.layers} Gemm {args.width}x{args.width} float32 + head); "
             f"{args.rounds} rounds, best of each; ratio = peak added / plain_path's peak added.", "",
             "| mode | peak added MB | ratio vs plain_path | resident after MB | wall s |", "|---|---|---|---|---|"]
    for mode in MODES:
        best = min(rows[mode], key=lambda r: r["peak_added_mb"])
        lines.append(f"| {mode} | {best['peak_added_mb']:.0f} | {best['peak_added_mb'] / base:.2f}x | "
                     f"{best['resident_after_mb']:.0f} | {min(r['wall_s'] for r in rows[mode]):.2f} |")
    lines.append(f"\nLoad average (1 min) {load0:.1f} at start, {load1:.1f} at end, {os.cpu_count()} CPUs.")
    md = "\n".join(lines)
    (work / "bundle_memory.md").write_text(md + "\n")
    (work / "bundle_memory.json").write_text(json.dumps(rows, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
