"""Profile each variant the way an on-device team must: accuracy, latency, memory, size,
cold start and an energy proxy, then check them against budgets.

Each variant runs in a fresh spawned process, so cold start and the memory it adds
are measured from a clean interpreter rather than from a warm parent. Memory is the
peak the session adds per batch size (1, the latency batch, the accuracy batch): the
batch-1 figure is what a device answering single queries needs, and the budget's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hardening.compression import Variant
from hardening.data import Dataset
from hardening.errors import InputError
from hardening.intake import check_fits, load_model

ACCURACY_BATCH = 256
RAPL_PATH = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
BUDGET_KEYS = ("max_latency_p95_ms", "max_memory_mb", "max_size_kb", "min_accuracy", "max_cold_start_ms")


@dataclass
class Budgets:
    """Limits a variant must meet; ``None`` means unchecked."""

    max_latency_p95_ms: float | None = None
    max_memory_mb: float | None = None
    max_size_kb: float | None = None
    min_accuracy: float | None = None
    max_cold_start_ms: float | None = None

    @classmethod
    def from_toml(cls, path: str | Path) -> Budgets:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InputError(f"{path}: cannot read budgets ({e})") from None
        section = doc.get("budgets", doc)
        where = "[budgets]" if "budgets" in doc else "the top level"
        if not isinstance(section, dict):
            raise InputError(f"{path}: [budgets] must be a table")
        unknown = set(section) - set(BUDGET_KEYS)
        if unknown:
            raise InputError(f"{path}: unknown budget key(s) {sorted(unknown)} in {where}; known: {', '.join(BUDGET_KEYS)}")
        bad = {k: v for k, v in section.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            k, v = next(iter(bad.items()))
            raise InputError(f"{path}: {where} {k} must be a number, got {v!r}")
        return cls(**{k: float(v) for k, v in section.items()})


@dataclass
class LatencyStats:
    batch: int
    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float


@dataclass
class BatchMemory:
    """Peak resident memory the session added, up to and including runs at ``batch`` rows."""

    batch: int
    memory_added_mb: float


@dataclass
class VariantProfile:
    name: str
    kind: str
    size_bytes: int
    accuracy: float
    agreement_with_float: float
    latency: list[LatencyStats]
    threads: int
    cold_start_ms: float
    session_create_ms: float
    memory_added_mb: float  # at batch 1, what a device answering single queries needs
    memory_by_batch: list[BatchMemory]
    cpu_ms_per_inference: float
    energy_mj_per_inference: float | None
    energy_source: str
    process_peak_rss_mb: float = 0.0  # the measuring child's whole peak (VmHWM), interpreter included
    budget_checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.budget_checks.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@dataclass
class ProfileReport:
    variants: list[VariantProfile]
    host: dict
    budgets: Budgets

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants)

    def to_dict(self) -> dict:
        return {
            "host": self.host,
            "budgets": asdict(self.budgets),
            "passed": self.passed,
            "variants": [v.to_dict() for v in self.variants],
        }


def _status_kb(field: str) -> int:
    """VmRSS / VmHWM from /proc: unlike ru_maxrss, VmHWM starts afresh at exec,
    so a spawned child does not inherit its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _read_rapl() -> int | None:
    try:
        return int(RAPL_PATH.read_text())
    except (OSError, ValueError):
        return None


def _percentiles(samples: list[float], batch: int) -> LatencyStats:
    a = np.asarray(samples) * 1e3
    return LatencyStats(batch, len(a), *(float(np.percentile(a, q)) for q in (50, 95, 99)), float(a.mean()))


def _measure(path: str, x: np.ndarray, threads: int, runs: int, big_batch: int) -> dict:
    """Runs in a fresh process: everything here is measured from a clean interpreter."""
    from hardening.intake import make_session

    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    sess = make_session(path, threads)
    t1 = time.perf_counter()
    name = sess.get_inputs()[0].name
    logits_name = sess.get_outputs()[0].name
    sess.run([logits_name], {name: x[:1]})
    t2 = time.perf_counter()

    # batch sizes in increasing order, the high-water mark read after each: the peak each needs
    memory: list[tuple[int, float]] = []
    lat = []
    for batch, n in ((1, runs), (big_batch, max(10, runs // 4))):
        xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
        for _ in range(10):
            sess.run([logits_name], {name: xb})
        samples = []
        e0, c0 = _read_rapl(), time.process_time()
        for _ in range(n):
            s = time.perf_counter()
            sess.run([logits_name], {name: xb})
            samples.append(time.perf_counter() - s)
        c1, e1 = time.process_time(), _read_rapl()
        lat.append((batch, samples, (c1 - c0) / (n * batch), None if e0 is None or e1 is None else (e1 - e0) / (n * batch)))
        memory.append((batch, max(0, _status_kb("VmHWM") - base_kb) / 1024))
    preds = np.concatenate([sess.run([logits_name], {name: x[i : i + ACCURACY_BATCH]})[0].argmax(1)
                            for i in range(0, len(x), ACCURACY_BATCH)])
    memory.append((min(ACCURACY_BATCH, len(x)), max(0, _status_kb("VmHWM") - base_kb) / 1024))
    return {
        "preds": preds,
        "session_create_ms": (t1 - t0) * 1e3,
        "cold_start_ms": (t2 - t0) * 1e3,
        "memory_added_mb": memory[0][1],
        "memory_by_batch": memory,
        "latency": [(b, s) for b, s, _, _ in lat],
        "cpu_ms_per_inference": lat[0][2] * 1e3,
        "energy_uj_per_inference": lat[0][3],
        "process_peak_rss_mb": _status_kb("VmHWM") / 1024,
    }


def _check(p: VariantProfile, b: Budgets) -> dict[str, bool]:
    p95_b1 = p.latency[0].p95_ms
    checks = {
        "max_latency_p95_ms": (b.max_latency_p95_ms, p95_b1 <= (b.max_latency_p95_ms or 0)),
        "max_memory_mb": (b.max_memory_mb, p.memory_added_mb <= (b.max_memory_mb or 0)),
        "max_size_kb": (b.max_size_kb, p.size_bytes / 1024 <= (b.max_size_kb or 0)),
        "min_accuracy": (b.min_accuracy, p.accuracy >= (b.min_accuracy or 0)),
        "max_cold_start_ms": (b.max_cold_start_ms, p.cold_start_ms <= (b.max_cold_start_ms or 0)),
    }
    return {k: ok for k, (limit, ok) in checks.items() if limit is not None}


def profile_variants(
    variants: list[Variant],
    ds: Dataset,
    budgets: Budgets | None = None,
    threads: int = 1,
    runs: int = 200,
    big_batch: int = 32,
    progress=None,
) -> ProfileReport:
    """Profile every variant on the same data in one run; the first float variant is the reference.
    ``progress(name)`` after each variant."""
    if runs < 10:
        raise InputError(f"runs must be at least 10, got {runs}")
    budgets = budgets or Budgets()
    for v in variants:
        check_fits(load_model(v.path), ds)
    ctx = mp.get_context("spawn")
    results = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for v in variants:
            results.append(pool.apply(_measure, (v.path, ds.x, threads, runs, big_batch)))
            if progress is not None:
                progress(v.name)
    ref_idx = next((i for i, v in enumerate(variants) if v.kind == "float"), 0)
    ref = results[ref_idx]["preds"]
    energy_src = "RAPL package-0" if _read_rapl() is not None else "unavailable (no readable RAPL counter)"
    profiles = []
    for v, r in zip(variants, results):
        energy = r["energy_uj_per_inference"]
        p = VariantProfile(
            name=v.name,
            kind=v.kind,
            size_bytes=Path(v.path).stat().st_size,
            accuracy=float((r["preds"] == ds.y).mean()),
            agreement_with_float=float((r["preds"] == ref).mean()),
            latency=[_percentiles(s, b) for b, s in r["latency"]],
            threads=threads,
            cold_start_ms=r["cold_start_ms"],
            session_create_ms=r["session_create_ms"],
            memory_added_mb=r["memory_added_mb"],
            memory_by_batch=[BatchMemory(b, m) for b, m in r["memory_by_batch"]],
            cpu_ms_per_inference=r["cpu_ms_per_inference"],
            energy_mj_per_inference=None if energy is None else energy / 1e3,
            energy_source=energy_src,
            process_peak_rss_mb=round(r["process_peak_rss_mb"], 1),
        )
        p.budget_checks = _check(p, budgets)
        profiles.append(p)
    host = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": __import__("onnxruntime").__version__,
    }
    return ProfileReport(profiles, host, budgets)
