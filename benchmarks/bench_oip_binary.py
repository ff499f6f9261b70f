"""OIP v2 binary tensor inference vs JSON v1 for a 3x96x96 float32 input, same server, one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_oip_binary.py --requests 400 --clients 2

Builds a small image classifier in ONNX (conv 3->8 stride 4, global pool, 10-way
linear; 3x96x96 input), signs it into a bundle, starts one real ``edgeward serve``
process and sends the same inputs as ``POST /v1/predict`` JSON (the baseline) and as
``POST /v2/models/<name>/infer`` with the binary tensor data extension (binary input
and binary outputs), interleaved in rounds so both see the same machine state.
Prints requests/s and p50/p99 latency per format and the ratio (baseline JSON v1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parent.parent
SHAPE = (3, 96, 96)


def build_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.normal(0, 0.3, (8, 10)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], strides=[4, 4], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "img", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", *SHAPE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], [w, b, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def build_bundle(work: Path) -> list[str]:
    from runtime_guard.bundle import generate_kek, generate_signing_keypair, write_bundle
    from runtime_guard.config import GuardConfig

    model = build_model()
    priv, pub = generate_signing_keypair()
    (work / "pub.pem").write_bytes(pub)
    kek = generate_kek()
    key_file = work / "kek.key"
    key_file.write_bytes(kek.hex().encode())
    os.chmod(key_file, 0o600)
    runtime = GuardConfig.from_dict({"input": {"value_range": [0.0, 1.0], "max_batch": 8},
                                     "rate_limit": {"per_client": "1000000/minute"},
                                     "anomaly": {"action": "off"}, "extraction": {"enabled": False}}).to_dict()
    # no golden set: a 3x96x96 one does not fit the manifest size cap (the guard still smoke-runs)
    write_bundle(work / "img.ewb", {"model": model}, {"model": {"name": "img"}, "runtime": runtime}, priv, kek, 1)
    return [str(work / "img.ewb"), "--public-key", str(work / "pub.pem"), "--key-file", str(key_file)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bodies(x: np.ndarray) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return {
        "json_v1": ("/v1/predict", json.dumps({"inputs": x.tolist()}).encode(),
                    {"Content-Type": "application/json"}),
        "binary_v2": ("/v2/models/img/infer", head + x.astype("<f4").tobytes(),
                      {"Inference-Header-Content-Length": str(len(head))}),
    }


def run(url: str, path: str, body: bytes, headers: dict[str, str], n: int, clients: int) -> tuple[float, list[float]]:
    lat: list[float] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        s = requests.Session()
        mine = []
        for _ in range(count):
            t0 = time.perf_counter()
            r = s.post(url + path, data=body, headers=headers)
            mine.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text[:200]
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(n // clients,)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="per format, split over rounds")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        log = open(work / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "hardening", "serve", *build_bundle(work), "--port", str(port),
                                 "--threads", "4", "--no-access-log"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if requests.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            x = np.random.default_rng(2).uniform(size=(1, *SHAPE)).astype(np.float32)
            forms = bodies(x)
            for path, body, headers in forms.values():  # warm-up
                run(url, path, body, headers, 20, 1)
            totals = {k: [0.0, []] for k in forms}
            per_round = args.requests // args.rounds
            for _ in range(args.rounds):
                for name, (path, body, headers) in forms.items():
                    secs, lat = run(url, path, body, headers, per_round, args.clients)
                    totals[name][0] += secs
                    totals[name][1].extend(lat)
            load = os.getloadavg()[0]
            print(f"3x96x96 float32, {args.requests} requests per format, {args.clients} clients, "
                  f"one server (4 threads), load average {load:.1f}")
            print(f"{'format':<10} {'body bytes':>10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
            res = {}
            for name, (secs, lat) in totals.items():
                rps = len(lat) / secs
                p50, p99 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3
                res[name] = (rps, p50, p99)
                print(f"{name:<10} {len(forms[name][1]):>10} {rps:>8.1f} {p50:>8.2f} {p99:>8.2f}")
            b, j = res["binary_v2"], res["json_v1"]
            print(f"ratio binary_v2 / json_v1 (baseline json_v1): throughput {b[0] / j[0]:.2f}x, "
                  f"p50 {b[1] / j[1]:.2f}x, p99 {b[2] / j[2]:.2f}x")
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()


if __name__ == "__main__":
    main()
