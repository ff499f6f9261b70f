"""Guarded ``/v1/predict`` vs a bare Flask + onnxruntime endpoint, same waitress settings.

Both servers run as separate processes under waitress with the same thread
count and the same ONNX model (digits demo, one intra-op thread); the load
generator is this process: ``--clients`` closed-loop keep-alive connections
sending one-sample JSON requests. Reports throughput and p50/p99 latency of
each, and the guarded/bare throughput ratio (target >= 0.85).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_api.py [--demo-dir /tmp/demo/digits]

The guarded servers run with API keys on (one key per load client) and the
bundle's runtime policy: sanitizer, per-key rate limit (memory storage), output
policy "full", telemetry, plus API-side JSON validation and metrics; the rows
add the anomaly gate and PRADA, another limiter strategy, or RateLimit-*
headers on every answer (see ``variants``). A second table times the same apps
in this process without HTTP (WSGI calls, ``time.process_time``).
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
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# -- the bare baseline (also run as a subprocess via --serve-bare) -----------------

def bare_app(model_path: str):
    import numpy as np
    import onnxruntime as ort
    from flask import Flask, jsonify, request

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    app = Flask("bare")

    @app.post("/v1/predict")
    def predict():
        x = np.asarray(request.get_json()["inputs"], dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        logits = sess.run([out], {inp: x})[0]
        z = logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
        return jsonify(labels=logits.argmax(axis=1).tolist(), scores=p.tolist())

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    return app


def serve_bare(model_path: str, port: int, threads: int) -> None:
    """Same waitress runner and settings as ``edgeward serve``."""
    from api.server import listen_socket, run_waitress

    app = bare_app(model_path)
    run_waitress(app, listen_socket("127.0.0.1", port, reuseport=False), threads, 8 * 1024 * 1024)


# -- harness ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def run_load(port: int, body: bytes, clients: int, total: int, warmup: int,
             keys: list[str] | None = None) -> dict:
    """Closed loop: ``clients`` threads, each with one keep-alive connection.
    Warm-up runs first on the same connections; the clock covers only the
    ``total`` measured requests."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    left = [total]
    headers = {"Content-Type": "application/json"}
    warm_done = threading.Barrier(clients + 1)
    go = threading.Event()

    def one(conn: http.client.HTTPConnection, hdrs: dict[str, str]) -> tuple[int, float]:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/predict", body=body, headers=hdrs)
        r = conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t0

    def worker(i: int) -> None:
        hdrs = dict(headers)
        if keys:
            hdrs["Authorization"] = "Bearer " + keys[i]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for _ in range(max(1, warmup // clients)):
            one(conn, hdrs)
        warm_done.wait()
        go.wait()
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            status, dt = one(conn, hdrs)
            with lock:
                lat.append(dt)
                errors[0] += status != 200
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    warm_done.wait()
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "errors": errors[0],
        "rps": len(lat) / elapsed,
        "p50_ms": 1e3 * lat[len(lat) // 2],
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "mean_ms": 1e3 * statistics.fmean(lat),
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of the server process (robust to a busy machine)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# name -> (runtime policy, extra `edgeward serve` flags, what it adds); per-API-key limit, memory storage
def variants(rate: str) -> dict[str, tuple[dict, list[str], str]]:
    base = {"input": {"value_range": [0.0, 1.0]}, "output": {"policy": "full"}}
    off = {"anomaly": {"action": "off"}, "extraction": {"enabled": False}}
    mw = {"per_client": rate}  # default strategy: moving window
    return {
        "guarded": ({**base, **off, "rate_limit": mw}, [],
                    "API keys, JSON validation, sanitizer, moving-window rate limit (the default), "
                    "output policy, telemetry, metrics, X-Request-ID and the JSON access log; "
                    "RateLimit-* on 429s only (the default)"),
        "guarded, no access log": ({**base, **off, "rate_limit": mw}, ["--no-access-log"],
                                   "same without the JSON access log (on by default)"),
        "guarded, sliding-window-counter": (
            {**base, **off, "rate_limit": {**mw, "strategy": "sliding-window-counter"}}, [],
            "same with the sliding-window-counter strategy"),
        "guarded, RateLimit-* always": ({**base, **off, "rate_limit": mw}, ["--rate-limit-headers", "always"],
                                        "same with RateLimit-* headers on every answer (one more limiter read)"),
        "guarded+ood+prada": ({**base, "rate_limit": mw, "anomaly": {"action": "flag"}}, [],
                              "guarded + MSP anomaly gate (flag) + PRADA extraction monitor"),
    }


def environ(body: bytes, key: str | None, path: str = "/v1/predict") -> dict:
    """A WSGI environ for one JSON POST to ``path`` (``key``: its bearer API key)."""
    import io

    env = {"REQUEST_METHOD": "POST", "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": "",
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
           "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
           "wsgi.input_terminated": True, "CONTENT_TYPE": "application/json",
           "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:8080"}
    if key is not None:
        env["HTTP_AUTHORIZATION"] = "Bearer " + key
    return env


def in_process_cpu(model: Path, bundles: dict[str, Path], work: Path, body: bytes, keys: list[str],
                   n: int = 2000, rounds: int = 5) -> dict[str, float]:
    """Server-side CPU per request without HTTP or other processes in the way: each
    app is called as a WSGI callable in this process (what waitress does after
    parsing HTTP), timed with ``time.process_time``; alternated over ``rounds``,
    medians. Steadier than req/s on a busy machine."""
    from api import create_app
    from api.config import ApiConfig

    apps = {"bare": bare_app(str(model))}
    for name, (_, flags, _) in variants("1/second").items():
        always = "always" if "--rate-limit-headers" in flags else "refusals"
        apps[name] = create_app(ApiConfig(bundle=str(bundles[name]), public_key=str(work / "pub.pem"),
                                          kek_file=str(work / "kek.key"), api_keys_file=str(work / "keys.json"),
                                          rate_limit_headers=always,
                                          access_log="--no-access-log" not in flags))
    import logging

    for handler in logging.getLogger("edgeward.access").handlers:  # written, as served, but not shown
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process

    def start_response(status: str, headers: list, exc_info: object = None) -> None:
        if not status.startswith("200"):
            raise RuntimeError(f"in-process request failed: {status}")

    samples: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, app in apps.items():
            who = [None] if name == "bare" else keys
            for i in range(n // 10 + n):
                if i == n // 10:
                    t0 = time.process_time()
                b"".join(app(environ(body, who[i % len(who)]), start_response))
            samples[name].append(1e3 * (time.process_time() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def _empty_npz() -> bytes:
    """A placeholder detectors.npz (the max-softmax detector has no fitted arrays)."""
    import io

    import numpy as np

    bio = io.BytesIO()
    np.savez(bio, unused=np.zeros(1))
    return bio.getvalue()


def _msp_detector_meta() -> dict:
    """One max-softmax-probability detector on the logits, no threshold (scored, never refused)."""
    return {
        "format": "edgeward-ood/1",
        "threshold": None,
        "fusion": {"rule": "mean_z", "members": ["msp"]},
        "detectors": [{"name": "msp", "kind": "msp", "view": "logits",
                       "norm": {"mean": 0.0, "std": 1.0}, "threshold": None,
                       "params": {"temperature": 1.0}}],
    }


def build_assets(demo_dir: Path | None, work: Path, rate: str) -> tuple[Path, dict[str, Path], bytes]:
    """Digits demo model, a fresh keypair + KEK, one bundle per variant, the request body."""
    import numpy as np

    from runtime_guard.bundle import generate_kek, generate_signing_keypair, write_bundle, write_secret_file
    from runtime_guard.config import GuardConfig

    if demo_dir is None:
        from hardening.demo import build_demo

        demo = build_demo("digits", work / "demo")
        model_path, data_path = Path(demo.model_path), Path(demo.data_path)
    else:
        model_path, data_path = demo_dir / "model.onnx", demo_dir / "data.npz"
    with np.load(data_path, allow_pickle=False) as z:
        x = z["x"][:1].astype(np.float32)
    priv, pub = generate_signing_keypair()
    (work / "pub.pem").write_bytes(pub)
    kek = generate_kek()
    write_secret_file(work / "kek.key", kek.hex().encode())

    bundles = {}
    for i, (name, (policy, _, _)) in enumerate(variants(rate).items()):
        payloads = {"model": model_path.read_bytes()}
        if policy.get("anomaly", {}).get("action") != "off":
            policy["anomaly"]["detector_meta"] = _msp_detector_meta()
            payloads["detectors.npz"] = _empty_npz()
        runtime = GuardConfig.from_dict(policy).to_dict()
        bundles[name] = work / f"bench{i}.ewb"
        write_bundle(bundles[name], payloads, {"model": {"name": "digits"}, "runtime": runtime}, priv, kek, 1)
    body = json.dumps({"inputs": x.tolist()}).encode()
    return model_path, bundles, body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=None, help="prebuilt digits demo (model.onnx, data.npz)")
    ap.add_argument("--threads", type=int, default=4, help="waitress threads (all servers)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=400, help="measured requests per round")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds; medians are reported")
    ap.add_argument("--rate-limit", default="6000/minute", help="per-API-key limit in the bundles")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "api.md")
    ap.add_argument("--serve-bare", nargs=3, metavar=("MODEL", "PORT", "THREADS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_bare:
        serve_bare(a.serve_bare[0], int(a.serve_bare[1]), int(a.serve_bare[2]))
        return

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    load_start = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, bundles, body = build_assets(a.demo_dir, work, a.rate_limit)
        from api.auth import add_key

        keys = [add_key(work / "keys.json", f"client{i}") for i in range(a.clients)]
        commands = {"bare": [sys.executable, __file__, "--serve-bare", str(model), "{port}", str(a.threads)]}
        def serve_args(bundle: Path) -> list[str]:
            return ["serve", str(bundle), "--public-key", str(work / "pub.pem"), "--key-file",
                    str(work / "kek.key"), "--port", "{port}", "--threads", str(a.threads),
                    "--api-keys", str(work / "keys.json")]

        for name, (_, flags, _) in variants(a.rate_limit).items():
            commands[name] = [sys.executable, "-m", "hardening", *serve_args(bundles[name]), *flags]
        procs: dict[str, tuple[subprocess.Popen, int]] = {}
        try:
            for name, cmd in commands.items():  # all servers up at once; idle ones cost nothing
                port = free_port()
                procs[name] = (subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], cwd=REPO,
                                                env=env, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL), port)
                wait_up(port, procs[name][0])
            rounds: dict[str, list[dict]] = {name: [] for name in commands}
            for _ in range(a.rounds):  # interleaved, so machine-load drift hits every variant alike
                for name, (proc, port) in procs.items():
                    cpu0 = _cpu_seconds(proc.pid)
                    r = run_load(port, body, a.clients, a.requests, a.warmup,
                                 None if name == "bare" else keys)
                    r["cpu_ms_per_req"] = 1e3 * (_cpu_seconds(proc.pid) - cpu0) / (a.requests + a.warmup)
                    rounds[name].append(r)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
            for proc, _ in procs.values():
                proc.wait(timeout=15)
        cpu = in_process_cpu(model, bundles, work, body, keys)
    results = {}
    for name, rs in rounds.items():
        results[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        results[name]["ratios"] = [r["rps"] / b["rps"] for r, b in zip(rs, rounds["bare"])]
    lines = [
        "# API benchmark: guarded /v1/predict vs bare Flask + onnxruntime",
        "",
        f"Command: `PYTHONPATH=. .venv/bin/python benchmarks/bench_api.py --threads {a.threads} "
        f"--clients {a.clients} --requests {a.requests} --rounds {a.rounds}`",
        "",
        f"All servers under waitress ({a.threads} threads), same digits ONNX model (1 intra-op thread), "
        f"one-sample JSON requests, {a.clients} keep-alive closed-loop clients (one API key each on "
        f"the guarded servers, limit {a.rate_limit} per key: never reached), {a.requests} measured "
        f"requests after {a.warmup} warm-up per round, {a.rounds} interleaved rounds (medians); {os.cpu_count()} CPU cores shared by the load client "
        f"and the server; load average {load_start:.1f} at start (other jobs on the machine).",
        "",
        "| endpoint | req/s | x bare (median of rounds) | per-round ratios | p50 ms | p99 ms | server CPU ms/req | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        ratios = ", ".join(f"{v:.2f}" for v in r["ratios"])
        lines.append(f"| {name} | {r['rps']:.0f} | {statistics.median(r['ratios']):.2f} | {ratios} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_ms_per_req']:.3f} | {r['errors']:.0f} |")
    lines += ["", "Steadier view, same apps without HTTP: CPU per request in one process (each app "
              "called as a WSGI callable, `time.process_time`, alternated, medians of 5 x 2000 requests):", "",
              "| endpoint | CPU ms/req | bare / this |", "|---|---:|---:|"]
    lines += [f"| {name} | {v:.3f} | {cpu['bare'] / v:.2f} |" for name, v in cpu.items()]
    lines += ["", "What each guarded row runs:", "",
              "- bare: `request.get_json()` -> `InferenceSession.run` -> softmax -> JSON."]
    lines += [f"- {name}: {desc}." for name, (_, _, desc) in variants(a.rate_limit).items()]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)


if __name__ == "__main__":
    main()
