"""``edgeward compress``'s pruned variants against float, per source kind, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_compress_pruning.py --cache /tmp/prune15/cache \
        --out /tmp/prune15/bench --runs 200

Targets: MobileNetV3-small 3x96x96 (``hardening/reference_models.py``) with its TorchScript
source (pruned variants fine-tuned through harden's recipes) and ONNX-only (weights zeroed
on the graph, sparsity chosen on ``x_cal``); the digits demo with its state dict and
ONNX-only. For each: ``compress`` wall time (all five kinds, quick profile), then every
variant profiled in one run (``profile_variants``: 1 onnxruntime thread, p50 at batch 1):
accuracy on all of ``x``, file size and p50 against float (the baseline of every ratio),
plus what each pruned variant is and how it was made (fine-tune epochs and seconds,
accuracy recovered, the grid measured, or why it was skipped). Prints markdown tables and
the load average; writes ``OUT/bench.json``. Main's baseline (a1f707f): the untuned
``pruned_structured`` of the MobileNet at 0.097 accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def _models(cache: Path) -> dict[str, tuple[str, str | None, str]]:
    from hardening.demo import build_demo
    from hardening.reference_models import build_reference

    mn = cache / "mnv3"
    if not (mn / "reference.json").is_file():
        build_reference("mobilenet_v3_small", mn, size=96)
    ref = json.loads((mn / "reference.json").read_text())
    dg = cache / "digits"
    if not (dg / "demo.json").is_file():
        build_demo("digits", dg)
    return {
        "mobilenet_torchscript": (ref["model_path"], ref["torchscript_path"], ref["data_path"]),
        "mobilenet_onnx_only": (ref["model_path"], None, ref["data_path"]),
        "digits_state_dict": (str(dg / "model.onnx"), str(dg / "model.pt"), str(dg / "data.npz")),
        "digits_onnx_only": (str(dg / "model.onnx"), None, str(dg / "data.npz")),
    }


def _how(recipe: dict) -> str:
    if "fine_tune" in recipe:
        ft, h = recipe["fine_tune"], recipe["heldout"]
        rec = "" if h.get("accuracy_recovered") is None else f", recovered {h['accuracy_recovered']:+.3f} on x_cal"
        return (f"fine-tuned {ft['epochs_completed']}/{ft['epochs_budget']} epochs in {ft['seconds']:.1f} s "
                f"({ft['stopped_by']}){rec}")
    if "selection" in recipe:
        grid = ", ".join(f"{g['sparsity']:g}: {g['accuracy']:.3f}" for g in recipe["selection"]["grid"])
        return f"ONNX-level, chose {recipe['target_sparsity']:g} (x_cal accuracy by sparsity {grid})"
    return ""


def run_target(name: str, model: str, source: str | None, data: str, out: Path, runs: int) -> dict:
    from hardening.compression import compress, skipped_variants
    from hardening.data import load_dataset
    from hardening.profiling import profile_variants

    t0 = time.perf_counter()
    variants = compress(model, data, out / name, torch_source=source)
    wall = time.perf_counter() - t0
    keep = [v for v in variants if v.kind in ("float", "pruned_unstructured", "pruned_structured")]
    prof = {p.name: p for p in profile_variants(keep, load_dataset(data), threads=1, runs=runs).variants}
    base = prof["float"]
    b0 = next(s for s in base.latency if s.batch == 1).p50_ms
    rows = []
    for v in keep:
        p = prof[v.name]
        p50 = next(s for s in p.latency if s.batch == 1).p50_ms
        rows.append({"variant": v.name, "accuracy": p.accuracy, "size_kib": p.size_bytes / 1024,
                     "size_ratio": p.size_bytes / base.size_bytes, "p50_ms": p50, "p50_ratio": p50 / b0,
                     "what": v.recipe.get("what", "float"), "how": _how(v.recipe),
                     "parameters": v.recipe.get("parameters_after"), "seconds": v.recipe.get("seconds")})
    skipped = [{"variant": s["name"], "skipped": s["skipped"]} for s in skipped_variants(out / name / "variants.json")]
    return {"target": name, "compress_seconds": wall, "load_after": _load(), "rows": rows, "skipped": skipped}


def markdown(res: dict) -> str:
    lines = [f"**{res['target']}**: compress (5 kinds, quick) {res['compress_seconds']:.1f} s, load after "
             f"{res['load_after']}", "",
             "| variant | acc on `x` | file KiB (vs float) | p50 batch 1 ms (vs float) | what it is | how |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| `{r['variant']}` | {r['accuracy']:.3f} | {r['size_kib']:.1f} ({r['size_ratio']:.2f}x) | "
                     f"{r['p50_ms']:.3f} ({r['p50_ratio']:.2f}x) | {r['what']} | {r['how']} |")
    for s in res["skipped"]:
        lines.append(f"| `{s['variant']}` | — | — | — | skipped | {s['skipped']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bench-compress/cache"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-compress/out"))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--targets", default="", help="comma-separated subset of the targets")
    args = ap.parse_args()
    models = _models(args.cache)
    wanted = [t for t in (args.targets.split(",") if args.targets else models)]
    results = {"load_start": _load(), "targets": []}
    for t in wanted:
        res = run_target(t, *models[t], args.out, args.runs)
        results["targets"].append(res)
        print(markdown(res) + "\n", flush=True)
    results["load_end"] = _load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"load average (1/5/15 min) at start {results['load_start']}, at end {results['load_end']}")


if __name__ == "__main__":
    main()
