"""Overhead of GuardedModel.predict over a bare InferenceSession.run (batch 1, digits demo or any model).

Both run in the same process on the same admitted model and the same inputs, in
alternating blocks of 50 calls (``BLOCK``) so CPU frequency drift hits both equally; the bare
baseline is its own session (a gated guard's session runs its gate too). Reports p50/p99 per
variant, the p50 ratio and the added microseconds. PYTHONPATH=an older checkout measures that
tree with this script.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_guard_overhead.py [--demo-dir /tmp/demo/digits] [-n 20000]
    PYTHONPATH=. .venv/bin/python benchmarks/bench_guard_overhead.py --model-dir DIR [--ood-dir DET] [-n 5000]

Without --demo-dir the digits demo is built into a temp dir first (~8 s). ``--model-dir``
takes any ``model.onnx`` + ``data.npz`` (e.g. ``hardening.reference_models.build_reference``'s
MobileNetV3-small at 3x96x96): the gate is fitted like ``edgeward fit-ood`` (or read from
``--ood-dir``) and both the bare and the guarded runs use the model with the features
output the detectors read. Only the public ``prepare_model``/``fit_ensemble``/``export_detectors``
are used, so the same script measures an older checkout (PYTHONPATH=that checkout).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime_guard.anomaly import FORMAT, AnomalyScorer
from runtime_guard.config import AnomalyGateConfig, ExtractionMonitorConfig, GuardConfig, InputSchema, RateLimitConfig
from runtime_guard.guard import GuardedModel
from runtime_guard.verdict import Decision, Verdict

ACCEPTED = Verdict(Decision.ACCEPTED)  # not verdict.ACCEPTED: older trees under comparison lack it


def _msp_scorer(threshold: float) -> AnomalyScorer:
    """A real exported-format detector set: MSP + energy on logits, fused by mean z."""
    import io

    buf = io.BytesIO()
    np.savez(buf)
    meta = {
        "format": FORMAT,
        "threshold": threshold,
        "fusion": {"rule": "mean_z", "members": ["msp", "energy"]},
        "detectors": [
            {"name": "msp", "kind": "msp", "view": "logits", "norm": {"mean": 0.0, "std": 1.0}},
            {"name": "energy", "kind": "energy", "view": "logits", "norm": {"mean": 0.0, "std": 10.0}},
        ],
    }
    return AnomalyScorer.from_bytes(buf.getvalue(), meta)


def _variants(model_bytes: bytes, fitted: AnomalyScorer | None = None,
              value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, GuardedModel]:
    """Defences switched on one after another, so each row's delta is that defence's cost."""
    schema = InputSchema(value_range=value_range)
    # per-client moving window as deployed; clients rotate every 500 calls (below the limit)
    limited = RateLimitConfig(per_client="1000/minute")
    unlimited = RateLimitConfig(per_client=None)
    no_mon, mon = ExtractionMonitorConfig(enabled=False), ExtractionMonitorConfig(enabled=True)
    gate = AnomalyGateConfig(action="flag")
    scorer = _msp_scorer(10.0)
    out = {
        "sanitizer+policy+telemetry": GuardedModel(
            model_bytes, GuardConfig(input=schema, rate_limit=unlimited, extraction=no_mon)
        ),
        "+ rate limit (gate off)": GuardedModel(model_bytes, GuardConfig(input=schema, rate_limit=limited, extraction=no_mon)),
        "+ gate on": GuardedModel(
            model_bytes, GuardConfig(input=schema, rate_limit=limited, extraction=no_mon, anomaly=gate), scorer
        ),
        "+ gate on + PRADA monitor": GuardedModel(
            model_bytes, GuardConfig(input=schema, rate_limit=limited, extraction=mon, anomaly=gate), scorer
        ),
    }
    if fitted is not None:
        # the target configuration: realistic defaults with the real `edgeward fit-ood` detectors
        out["target: limit + fitted 5-detector gate"] = GuardedModel(
            model_bytes, GuardConfig(input=schema, rate_limit=limited, extraction=no_mon, anomaly=gate), fitted
        )
    return out


# Bare and guarded calls alternate in blocks of this many: frequency drift still hits both
# equally, and each block runs with its own session's weights in cache (two sessions
# interleaved call by call would each evict the other's, which no device does).
BLOCK = 50


def _pct(a: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(a, dtype=np.float64), q)) / 1e3  # ns -> us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=None, help="folder with model.onnx + data.npz of the digits demo")
    ap.add_argument("--model-dir", type=Path, default=None, help="any model.onnx + data.npz (instead of the demo)")
    ap.add_argument("--inputs", type=int, default=200, help="test inputs cycled through (bounds memory)")
    ap.add_argument("-n", type=int, default=20000, help="timed calls per variant")
    ap.add_argument("--ood-dir", type=Path, default=None,
                    help="detectors from `edgeward fit-ood` (default: <demo-dir>/ood if present)")
    ap.add_argument("--only", default=None, help="run only variants whose name contains this text (e.g. target)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    base_dir = args.model_dir or args.demo_dir
    if base_dir is None:
        from hardening.demo import build_demo  # only the benchmark setup uses hardening

        demo = build_demo("digits", tempfile.mkdtemp(prefix="bench_guard_"))
        model_path, data_path = Path(demo.model_path), Path(demo.data_path)
    else:
        model_path, data_path = base_dir / "model.onnx", base_dir / "data.npz"
    with np.load(data_path, allow_pickle=False) as d:
        x_all = d["x"]  # read once: each d["x"] decodes the array anew
        # copies: a one-row view would keep the whole array alive, once per row
        xs = [np.array(x_all[i : i + 1], dtype=np.float32) for i in range(min(len(x_all), args.inputs))]
        lo, hi = float(min(x_all.min(), 0.0)), float(max(x_all.max(), 1.0))

    ood_dir = args.ood_dir or (args.demo_dir / "ood" if args.demo_dir is not None else None)
    from hardening.data import load_dataset  # setup only: the gate as `edgeward fit-ood` fits it
    from hardening.ood import export_detectors
    from hardening.ood.pipeline import fit_ensemble, prepare_model

    ds = load_dataset(data_path)
    if ood_dir is None or not (ood_dir / "detectors.npz").exists():
        pm = prepare_model(model_path, ds)
        ens, _, _ = fit_ensemble(pm, ds, 0.05)
        npz, meta = export_detectors(ens, model=pm.model_meta())
        fitted = AnomalyScorer.from_bytes(npz, meta)
    else:
        fitted = AnomalyScorer.load(ood_dir)
        pm = prepare_model(model_path, ds, (fitted.meta.get("model") or {}).get("features_tensor"))
    model_bytes = pm.model_bytes  # with the features output the detectors read
    guards = _variants(model_bytes, fitted, (lo, hi))
    if args.only:
        guards = {k: g for k, g in guards.items() if args.only in k}
    # the bare baseline: the same admitted model alone (a gated guard's own session runs its gate too)
    from runtime_guard.admission import load_session

    bare = load_session(model_bytes)
    name_in = bare.get_inputs()[0].name
    feeds = [{name_in: x} for x in xs]
    rows = []
    for v, (name, g) in enumerate(guards.items()):
        for i in range(500):
            bare.run(None, feeds[i % len(xs)])
            g.predict(xs[i % len(xs)], "warmup")
        t_bare, t_guard, c_bare, c_guard = [], [], [], []
        clock, cpu = time.perf_counter_ns, time.thread_time_ns
        for b0 in range(0, args.n, BLOCK):
            for i in range(b0, min(b0 + BLOCK, args.n)):
                j = i % len(xs)  # cycle through the test set: the same inputs for both
                t0, u0 = clock(), cpu()
                bare.run(None, feeds[j])
                t_bare.append(clock() - t0)
                c_bare.append(cpu() - u0)
            for i in range(b0, min(b0 + BLOCK, args.n)):
                j = i % len(xs)
                t1, u1 = clock(), cpu()
                # a new client every 500 calls: stays under its rate limit, monitor history stays realistic
                r = g.predict(xs[j], "client-%d-%d" % (v, i // 500))
                t_guard.append(clock() - t1)
                c_guard.append(cpu() - u1)
        assert r.ok, r
        b50, g50 = _pct(t_bare, 50), _pct(t_guard, 50)
        rows.append(
            {
                "variant": name,
                "bare_p50_us": round(b50, 1),
                "bare_p99_us": round(_pct(t_bare, 99), 1),
                "guard_p50_us": round(g50, 1),
                "guard_p99_us": round(_pct(t_guard, 99), 1),
                "ratio_p50": round(g50 / b50, 2),
                "added_p50_us": round(g50 - b50, 1),
                # CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID): excludes time the
                # scheduler gave to other processes, so it is the stable figure on a loaded box
                "bare_cpu_p50_us": round(_pct(c_bare, 50), 1),
                "guard_cpu_p50_us": round(_pct(c_guard, 50), 1),
                "added_cpu_p50_us": round(_pct(c_guard, 50) - _pct(c_bare, 50), 1),
                "added_cpu_mean_us": round((sum(c_guard) - sum(c_bare)) / len(c_guard) / 1e3, 1),
            }
        )
    parts = {}
    if "+ gate on + PRADA monitor" in guards:
        parts = _components(guards["+ gate on + PRADA monitor"], xs, args.n // 4)
    target = next((g for k, g in guards.items() if k.startswith("target")), None)
    gated = guards.get("+ gate on", target)  # any guard on the session with the features output
    if gated is not None:
        parts.update(_fitted_component(fitted, gated, xs, args.n // 4))
    if target is not None:
        parts.update(_in_context(target, bare, xs, args.n // 2))
    if args.json:
        print(json.dumps({"model": str(model_path), "end_to_end": rows, "components_p50_us": parts}, indent=2))
        return
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print("\ncomponent | p50_us")
    for k, v in parts.items():
        print(f"{k} | {v}")


def _fitted_component(scorer: AnomalyScorer, g: GuardedModel, xs: list[np.ndarray], n: int) -> dict[str, float]:
    """The real fitted gate alone (energy, Mahalanobis, kNN, input kNN, PCA) at batch 1."""
    outs = [g.session.run([g.logits_name, g.features_name], {g.input_name: x}) for x in xs]
    clock = time.perf_counter_ns
    ts = []
    for i in range(n):
        j = i % len(xs)
        t0 = clock()
        scorer.score(xs[j], outs[j][0], outs[j][1])
        ts.append(clock() - t0)
    return {"fitted 5-detector gate score (fused)": round(_pct(ts, 50), 1)}


def _components(g: GuardedModel, xs: list[np.ndarray], n: int) -> dict[str, float]:
    """Each stage alone at batch 1 (p50 us), to attribute the end-to-end overhead."""
    sess, name = g.session, g.input_name
    logits = [sess.run([g.logits_name], {name: x})[0] for x in xs]
    labels = [lg.argmax(1) for lg in logits]
    ood = [g.anomaly.score(x, lg, None) for x, lg in zip(xs, logits)]
    stages = {
        "rate limit hit (per-client moving window, memory://)": lambda i, j: g.limiter.hit("c%d" % (i // 500)),
        "sanitizer": lambda i, j: g.sanitizer(xs[j]),
        "anomaly score (MSP + energy, fused)": lambda i, j: g.anomaly.score(xs[j], logits[j], None),
        "PRADA observe (incl. amortised Shapiro-Wilk)": lambda i, j: g.monitor.observe("m%d" % (i // 500), xs[j], labels[j]),
        "output policy (full softmax)": lambda i, j: g.policy.apply(logits[j]),
        "telemetry record": lambda i, j: g.telemetry.record(ACCEPTED, 1e-4, labels[j], ood[j]),
    }
    out = {}
    clock = time.perf_counter_ns
    for label, fn in stages.items():
        ts = []
        for i in range(n):
            j = i % len(xs)
            t0 = clock()
            fn(i, j)
            ts.append(clock() - t0)
        out[label] = round(_pct(ts, 50), 1)
    return out


def _in_context(g: GuardedModel, bare: object, xs: list[np.ndarray], n: int) -> dict[str, float]:
    """The target guard's stages timed one after another inside each request, in
    ``predict``'s order, request after request as on a device: what each stage costs with
    caches as the model's run leaves them (alone they look cheaper). The bare run is timed in
    blocks of its own between blocks of requests (interleaved call by call with the guard's
    session, the two would evict each other's weights). A tree whose gate runs inside the guard's session (its outputs among
    the run's) times the gate in "guarded session.run"; its share is that run's excess over
    the bare one, plus the verdict."""
    clock = time.perf_counter_ns
    feeds = [{g.input_name: x} for x in xs]
    in_run = any(n.startswith("edgeward_gate/") for n in g._run_names)
    names = ["rate limit", "sanitizer", "guarded session.run" + (" (model + gate)" if in_run else ""),
             "finite check + argmax", "fitted gate " + ("verdict" if in_run else "score + verdict"),
             "output policy", "telemetry"]
    bare_ts: list[int] = []
    ts: list[list[int]] = [[] for _ in names]
    for i in range(n + 200):
        j = i % len(xs)
        if i % BLOCK == 0:  # a block of bare runs before each block of requests (frequency drift)
            for k in range(BLOCK):
                t0 = clock()
                bare.run(None, feeds[(j + k) % len(xs)])  # type: ignore[attr-defined]
                if i >= 200:
                    bare_ts.append(clock() - t0)
        t = [clock()]
        g._limit("ctx-%d" % (i // 500))
        t.append(clock())
        arr = g.sanitizer(xs[j])
        t.append(clock())
        outs = g.session.run(g._run_names, {g.input_name: arr})
        t.append(clock())
        row = outs[0].tolist()[0]
        raw = np.array((row.index(max(row)),)) if math.isfinite(sum(row)) else None
        t.append(clock())
        score = outs[-2] if in_run else g.anomaly.score(arr, outs[0], outs[1] if len(outs) > 1 else None)
        ood = np.array((score.item() > g.anomaly.threshold,))
        t.append(clock())
        g.policy.apply_labelled(outs[0], ood, raw)
        t.append(clock())
        g.telemetry.record(ACCEPTED, 1e-4, raw, score)
        t.append(clock())
        if i >= 200:  # the first 200: warm-up
            for k in range(len(names)):
                ts[k].append(t[k + 1] - t[k])
    out = {"in context: bare session.run": round(_pct(bare_ts, 50), 1)}
    out.update({f"in context: {k}": round(_pct(v, 50), 1) for k, v in zip(names, ts)})
    gate = out[f"in context: {names[4]}"] + (out[f"in context: {names[2]}"] - out["in context: bare session.run"]
                                              if in_run else 0.0)
    out["in context: fitted gate, score + verdict"] = round(gate, 1)
    out["in context: all guard stages but the gate"] = round(sum(
        v for k, v in out.items() if not k.endswith(("session.run", "(model + gate)", "verdict"))), 1)
    return out


if __name__ == "__main__":
    main()
