"""Issue 15's Must-show run: every release command on networks users actually ship.

Builds ResNet-18 at 3x32x32 and MobileNetV3-small at 3x96x96 (hardening/reference_models.py,
cached under ``--cache``), then runs the CLI exactly as a user would, one child process per
stage: ``edgeward audit`` (quick profile) with the TorchScript source and again ONNX-only,
``keygen``, ``package``, ``verify``, ``serve`` plus predictions as JSON and as
``application/x-npy``. Every stage must exit 0 or 1 (a check may fail); 2 or 3 for a valid
model is a bug. Per stage it records wall time, CPU time (user + system, from ``os.wait4``:
what the stage would take on an idle core when the machine is shared) and peak RSS: the largest resident set of
any process in the stage's tree (``os.wait4``'s ``ru_maxrss``) and the peak of the tree's
summed RSS (psutil, sampled every 0.1 s).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_realistic.py --out /tmp/realistic

``tests/test_shapes_end_to_end.py::test_realistic_flow_small`` (slow) drives the same
``run_flow`` on a small MobileNet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
EW = [sys.executable, "-m", "hardening"]
OK_CODES = (0, 1)  # 1: a check failed, which a valid model may do; 2/3 never


@dataclass
class Stage:
    model: str
    name: str
    argv: list[str]
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of the stage's processes (wait4): load-independent
    peak_rss_mb: float = 0.0  # largest single process of the stage (wait4 ru_maxrss)
    peak_tree_rss_mb: float = 0.0  # peak of the summed RSS of the stage's process tree
    note: str = ""
    stderr_tail: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.exit_code in OK_CODES


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _TreeSampler:
    """Peak summed RSS of a process and its descendants, sampled on a thread."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(pid, every), daemon=True)
        self._t.start()

    def _run(self, pid: int, every: float) -> None:
        try:
            import psutil
        except ImportError:  # the wait4 figure is still there
            return
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def _spawn(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([*EW, *argv], cwd=cwd, env=_env(), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _reap(stage: Stage, proc: subprocess.Popen, sampler: _TreeSampler, t0: float, log: Path) -> Stage:
    """Wait for ``proc`` with wait4 (its rusage), fill in ``stage``."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    stage.wall_s = round(time.perf_counter() - t0, 1)
    stage.exit_code = proc.returncode
    stage.cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
    stage.peak_rss_mb = round(usage.ru_maxrss / 1024, 1)  # KiB on Linux
    stage.peak_tree_rss_mb = round(max(sampler.stop(), usage.ru_maxrss * 1024) / 2**20, 1)
    stage.stderr_tail = log.read_text(errors="replace")[-3000:]
    return stage


def run_stage(model: str, name: str, argv: list[str], cwd: Path, timeout: float = 3600) -> Stage:
    stage = Stage(model, name, argv)
    log = cwd / f"{name}.log"
    t0 = time.perf_counter()
    proc = _spawn(argv, cwd, log)
    sampler = _TreeSampler(proc.pid)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        return _reap(stage, proc, sampler, t0, log)
    finally:
        timer.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_and_predict(model: str, bundle: Path, keys: Path, x: np.ndarray, cwd: Path,
                      n_predictions: int = 5, timeout: float = 300) -> Stage:
    """``edgeward serve`` the bundle, answer JSON and npy predictions, then SIGTERM."""
    import requests

    port = _free_port()
    argv = ["serve", str(bundle), "--public-key", str(keys / "signing.pub.pem"), "--key-file",
            str(keys / "kek.key"), "--host", "127.0.0.1", "--port", str(port)]
    stage = Stage(model, "serve", argv)
    log = cwd / "serve.log"
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = _spawn(argv, cwd, log)
    sampler = _TreeSampler(proc.pid)
    notes: list[str] = []
    try:
        deadline = time.time() + timeout
        ready = False
        while time.time() < deadline and proc.poll() is None:
            try:
                ready = requests.get(url + "/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                ready = False
            if ready:
                break
            time.sleep(0.2)
        if ready:
            notes.append(f"ready {time.perf_counter() - t0:.1f} s")
            codes: dict[str, list[int]] = {"json": [], "npy": []}
            agree = 0
            for i in range(n_predictions):
                sample = x[i:i + 1]
                rj = requests.post(url + "/v1/predict", json={"inputs": sample.tolist()}, timeout=60)
                buf = io.BytesIO()
                np.save(buf, sample, allow_pickle=False)
                rn = requests.post(url + "/v1/predict", data=buf.getvalue(), timeout=60,
                                   headers={"Content-Type": "application/x-npy"})
                codes["json"].append(rj.status_code)
                codes["npy"].append(rn.status_code)
                if rj.status_code == rn.status_code == 200 and rj.json() == rn.json():
                    agree += 1
            notes.append(f"json {codes['json']}, npy {codes['npy']}, same answer {agree}/{n_predictions}")
            if any(c not in (200, 422) for c in codes["json"] + codes["npy"]):  # 422: gate rejected
                notes.append("UNEXPECTED STATUS")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        timer = threading.Timer(30, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        try:
            _reap(stage, proc, sampler, t0, log)
        finally:
            timer.cancel()
    stage.note = "; ".join(notes) if notes else "never became ready"
    if stage.note == "never became ready" or "UNEXPECTED" in stage.note:
        stage.exit_code = stage.exit_code if stage.exit_code not in OK_CODES else 3
    return stage


def _pick_variant(report: Path) -> str:
    """int8_static when the review made one (what an edge user ships), else float."""
    kinds = [v["kind"] for v in json.loads(report.read_text())["variants"]]
    return "int8_static" if "int8_static" in kinds else "float"


def _logger(name: str, stages: list[Stage], log: "Callable[[str], object] | None") -> Callable[[Stage], Stage]:
    def add(stage: Stage) -> Stage:
        stages.append(stage)
        if log:
            log(f"  {name:<20} {stage.name:<17} exit {stage.exit_code}  {stage.wall_s:7.1f} s  "
                f"cpu {stage.cpu_s:7.1f} s  {stage.peak_rss_mb:7.0f} MB  {stage.note}")
        return stage
    return add


def release_flow(name: str, report: Path, data: Path, work: Path, n_predictions: int = 5,
                 log: "Callable[[str], object] | None" = print) -> list[Stage]:
    """keygen, package (int8_static if the review made one, else float), verify, serve +
    predictions, from an audit's report.json."""
    stages: list[Stage] = []
    add = _logger(name, stages, log)
    if not (work / "keys" / "signing.pem").exists():
        add(run_stage(name, "keygen", ["keygen", "--out", "keys"], work))
    variant = _pick_variant(report)
    st = add(run_stage(name, "package", ["package", str(report), "--variant", variant, "--out", "m.ewb",
                                         "--version", "1", "--signing-key", "keys/signing.pem",
                                         "--key-file", "keys/kek.key", "--force"], work))
    st.note = f"variant {variant}, bundle {os.path.getsize(work / 'm.ewb') / 1e6:.1f} MB" \
        if (work / "m.ewb").exists() else f"variant {variant}"
    if not (work / "m.ewb").exists():
        return stages
    add(run_stage(name, "verify", ["verify", "m.ewb", "--public-key", "keys/signing.pub.pem",
                                   "--key-file", "keys/kek.key", "--report", str(report)], work))
    shutil.copy(work / "m.ewb", work / "serve.ewb")
    with np.load(data, allow_pickle=False) as z:
        x = np.asarray(z["x"][:n_predictions], dtype=np.float32)
    add(serve_and_predict(name, work / "serve.ewb", work / "keys", x, work, n_predictions))
    return stages


def run_flow(name: str, model: Path, data: Path, source: Path | None, work: Path,
             policy: Path | None = None, onnx_only: bool = True, n_predictions: int = 5,
             log: "Callable[[str], object] | None" = print, audit_args: Sequence[str] = ()) -> list[Stage]:
    """Every command on one model, in the order a user needs them: the audit (with the
    TorchScript source when there is one), the release commands on its report, then the
    ONNX-only audit. Returns the stages in order (stops where the next stage lacks its input).
    ``audit_args`` go to both audits (e.g. ``--areas profiling --allow-skipped`` for a
    partial review when only the release commands are under test)."""
    work.mkdir(parents=True, exist_ok=True)
    pol = ["--policy", str(policy)] if policy is not None else []
    stages: list[Stage] = []
    add = _logger(name, stages, log)

    def audit(stage_name: str, out: str, extra: list[str]) -> Path:
        add(run_stage(name, stage_name, ["audit", str(model), "--data", str(data), "--out", out,
                                         "--profile", "quick", *extra, *pol, *audit_args], work))
        return work / out / "report.json"

    if source is not None:
        report = audit("audit_torchscript", "review_ts", ["--torch-source", str(source)])
    else:
        report = audit("audit_onnx_only", "review_onnx", [])
    if report.exists():
        stages += release_flow(name, report, data, work, n_predictions, log=log)
    if source is not None and onnx_only:
        audit("audit_onnx_only", "review_onnx", [])
    return stages


def table(stages: list[Stage]) -> str:
    rows = ["| model | stage | exit | wall s | CPU s | peak RSS MB (largest process) | peak RSS MB (process tree) | note |",
            "|---|---|---|---|---|---|---|---|"]
    for s in stages:
        rows.append(f"| {s.model} | {s.name} | {s.exit_code} | {s.wall_s} | {s.cpu_s} | {s.peak_rss_mb:.0f} | "
                    f"{s.peak_tree_rss_mb:.0f} | {s.note} |")
    return "\n".join(rows)


MODELS = {  # name: (architecture, image size)
    "resnet18_3x32x32": ("resnet18", 32),
    "mobilenet_v3_small_3x96x96": ("mobilenet_v3_small", 96),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/realistic"))
    ap.add_argument("--cache", type=Path, default=None, help="reference models (default OUT/models)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-onnx-only", action="store_true", help="skip the ONNX-only audit")
    ap.add_argument("--audit-args", default="", help="extra audit options, e.g. "
                    "'--areas profiling --kinds float,int8_static --allow-skipped' (a partial review)")
    ap.add_argument("--release-only", action="store_true",
                    help="only keygen/package/verify/serve, on OUT/<model>/review_ts/report.json "
                         "(waits up to an hour for it: an audit started earlier)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cache = args.cache or args.out / "models"
    load0 = os.getloadavg()
    all_stages: list[Stage] = []
    for name in args.models.split(","):
        arch, size = MODELS[name]
        ref_dir = cache / name
        if not (ref_dir / "reference.json").exists():
            import torch

            torch.set_num_threads(1)
            from hardening.reference_models import build_reference

            build_reference(arch, ref_dir, size=size)
        ref = json.loads((ref_dir / "reference.json").read_text())
        print(f"{name}: {ref['parameters']:,} parameters, test accuracy {ref['test_accuracy']:.3f}", flush=True)
        work = args.out / name
        if args.release_only:
            report = work / "review_ts" / "report.json"
            deadline = time.time() + 3600
            while not report.exists() and time.time() < deadline:
                time.sleep(10)
            time.sleep(10)  # the audit writes report.html and junit.xml after it
            all_stages += release_flow(name, report, Path(ref["data_path"]), work)
            continue
        shutil.rmtree(work, ignore_errors=True)
        all_stages += run_flow(name, Path(ref["model_path"]), Path(ref["data_path"]),
                               Path(ref["torchscript_path"]), work, onnx_only=not args.no_onnx_only,
                               audit_args=args.audit_args.split())
    load1 = os.getloadavg()
    md = table(all_stages)
    md += f"\n\nLoad average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f}, on {os.cpu_count()} CPUs.\n"
    tag = "-release" if args.release_only else ""
    (args.out / f"realistic{tag}.md").write_text(md)
    (args.out / f"realistic{tag}.json").write_text(json.dumps(
        [{**asdict(s), "stderr_tail": s.stderr_tail[-500:]} for s in all_stages], indent=2))
    print(md)
    bad = [s for s in all_stages if not s.ok]
    for s in bad:
        print(f"\n--- {s.model} {s.name} exited {s.exit_code}:\n{s.stderr_tail}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
