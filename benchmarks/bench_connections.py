"""Cost of the bounded-connection layer: the bare Flask + onnxruntime app under
``api.server.run_waitress`` (``api.connections`` listener, header deadline, per-peer caps,
``poll()``) vs plain ``waitress.serve`` with the settings edgeward used before issue 18.

Both servers run at once as subprocesses; rounds alternate between them (8 keep-alive
clients, one-sample JSON requests) and medians are reported.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_connections.py --demo-dir /tmp/demo/digits
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _serve(mode: str, model: str, port: int) -> None:
    from api.server import listen_socket, run_waitress

    from bench_api import bare_app

    app = bare_app(model)
    sock = listen_socket("127.0.0.1", port, reuseport=False)
    if mode == "bounded":
        run_waitress(app, sock, 4, 8 << 20)
        return
    import gc
    import logging

    from waitress import serve

    gc.collect()
    gc.freeze()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    sock.listen(1024)
    serve(app, sockets=[sock], threads=4, ident="edgeward", max_request_body_size=16 << 20,
          channel_timeout=30, connection_limit=1000, clear_untrusted_proxy_headers=True, _quiet=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round(port: int, body: str, n: int, clients: int) -> float:
    def run() -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(n // clients):
            c.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
            c.getresponse().read()
        c.close()

    ts = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, required=True, help="digits demo (model.onnx, data.npz)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--serve", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = str(args.demo_dir / "model.onnx")
    if args.serve:
        _serve(args.serve[0], model, int(args.serve[1]))
        return
    import numpy as np

    with np.load(args.demo_dir / "data.npz") as z:
        body = json.dumps({"inputs": z["x"][:1].tolist()})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = {}
    for mode in ("bounded", "plain"):
        port = _free_port()
        procs[mode] = (port, subprocess.Popen([sys.executable, __file__, "--demo-dir", str(args.demo_dir),
                                               "--serve", mode, str(port)], env=env))
    try:
        time.sleep(4)
        res: dict[str, list[float]] = {m: [] for m in procs}
        for m in procs:
            _round(procs[m][0], body, 100, 8)  # warm-up
        for r in range(args.rounds):
            for m in (("bounded", "plain") if r % 2 else ("plain", "bounded")):
                res[m].append(_round(procs[m][0], body, args.requests, 8))
        for m, v in res.items():
            print(f"{m}: median {statistics.median(v):.0f} req/s over {len(v)} rounds")
        print(f"bounded / plain: {statistics.median(res['bounded']) / statistics.median(res['plain']):.3f}")
    finally:
        for _, p in procs.values():
            p.terminate()
            p.wait(10)


if __name__ == "__main__":
    main()
