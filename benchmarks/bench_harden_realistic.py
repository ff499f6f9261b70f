"""``edgeward harden`` recipes on a realistic model and on the digits demo, side by side in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_harden_realistic.py --target mobilenet \
        --cache /tmp/h20/ref --out /tmp/h20/bench-mnv3 --n 100 --runs 200

``--target mobilenet``: MobileNetV3-small at 3x96x96 (``hardening/reference_models.py``, its
TorchScript file as ``--torch-source``, ``--profile large``); ``--target digits``: the 8x8
demo (state dict, ``--profile quick``). Every recipe in ``--recipes`` runs at the first
``--quant-bits``; each further bit width re-runs the quantization recipes (``ptq``, ``qat``,
``mixed``) into its own folder, listed as ``ptq@w4a8`` and so on. Then, in one run, every
variant is profiled (``profile_variants``: 1 onnxruntime thread, p50/p95 at batch 1) and
audited (``run_robustness_audit``: the masking-safe cascade at ``--eps``, each variant
through its own source). Prints one markdown table (ratios name their baseline: the float
model) plus the load average before and after, and writes ``OUT/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

QUANT = ("ptq", "qat", "mixed")
TARGETS = {
    "mobilenet": {"profile": "large", "recipes": "adv_pgd,trades,distill,adv_distill,prune_structured,int4,ptq,qat,mixed"},
    "digits": {"profile": "quick",
               "recipes": "adv_pgd,trades,distill,adv_distill,prune_structured,int4,ptq,qat,qat_pt2e,mixed"},
}


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def _model(target: str, cache: Path) -> tuple[str, str, str]:
    """(ONNX, PyTorch source, data) of the target, built once into ``cache``."""
    if target == "digits":
        from hardening.demo import build_demo

        a = build_demo("digits", cache / "digits")  # seconds; seeded, so the same model every run
        return a.model_path, a.torch_path, a.data_path
    from hardening.reference_models import build_reference

    d = cache / "mobilenet_v3_small_96"
    if not (d / "reference.json").is_file():
        build_reference("mobilenet_v3_small", d, size=96)
    return str(d / "model.onnx"), str(d / "model.ts"), str(d / "data.npz")


def run(args: argparse.Namespace) -> dict:
    import logging

    import torch

    from hardening.compression import Variant, load_variants
    from hardening.data import load_dataset
    from hardening.harden import harden
    from hardening.harden.base import parameters
    from hardening.profiling import profile_variants
    from hardening.robustness import run_robustness_audit
    from hardening.torch_source import load_torch_source

    torch.set_num_threads(1)
    for name in ("onnxscript", "onnx_ir"):  # the exporter's per-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    load_start = _load()
    cfg = TARGETS[args.target]
    model, source, data = _model(args.target, Path(args.cache))
    out = Path(args.out)
    bits = args.quant_bits.split(",")
    recipes = args.recipes or cfg["recipes"]
    timings: dict[str, float] = {}

    t_run = time.perf_counter()

    def progress(name: str) -> None:
        print(f"  harden: {name} (t={time.perf_counter() - t_run:.0f}s, load {_load()})", flush=True)

    t0 = time.perf_counter()
    if not (args.reuse and (out / "variants.json").is_file()):
        harden(model, source, data, recipes, out, profile=cfg["profile"], seed=args.seed, quant_bits=bits[0],
               progress=progress)
    timings["harden"] = time.perf_counter() - t0
    variants = load_variants(out / "variants.json")
    for name in filter(None, (args.also or "").split(",")):  # an earlier run's variants in the same OUT
        rec_file = out / f"{name}.recipe.json"
        rec = json.loads(rec_file.read_text()) if rec_file.is_file() else {
            "recipe": name, "parameters": parameters(load_torch_source(out / f"{name}.pt"))}
        variants.append(Variant(name, str(out / f"{name}.onnx"), name, "float", rec, "", str(out / f"{name}.pt")))
    for v in variants:  # what --also reads back
        (out / f"{v.name}.recipe.json").write_text(json.dumps(v.recipe, indent=2))
    for b in bits[1:]:
        extra = [r for r in args.quant_recipes.split(",") if r in QUANT]
        sub = out / f"bits-{b}"
        if extra and not (args.reuse and (sub / "variants.json").is_file()):
            t0 = time.perf_counter()
            harden(model, source, data, ",".join(extra), sub, profile=cfg["profile"], seed=args.seed, quant_bits=b,
                   progress=progress)
            timings[f"harden {b}"] = time.perf_counter() - t0
        variants += [replace(v, name=f"{v.name}@{b}") for v in load_variants(sub / "variants.json") if v.name != "float"]
    ds = load_dataset(data)
    print(f"profiling {len(variants)} variants (load {_load()})", flush=True)
    t0 = time.perf_counter()
    prof = profile_variants(variants, ds, threads=1, runs=args.runs)
    timings["profile"] = time.perf_counter() - t0
    print(f"auditing (load {_load()})", flush=True)
    t0 = time.perf_counter()
    attacks = args.attacks.split(",") if args.attacks else None
    by_rob = {}  # name -> {clean_accuracy, robust_accuracy, upper_bound, families}
    if args.audit_from:  # an earlier audit with the same settings (the cascade runs per variant)
        for r in json.loads(Path(args.audit_from).read_text())["variants"]:
            by_rob[r["name"]] = r
    audited = [v for v in variants if (not args.audit_variants or v.name in args.audit_variants.split(","))
               and v.name not in by_rob]
    if args.n and audited:
        rob = run_robustness_audit(audited, ds, eps=[args.eps], n=args.n, seed=args.seed, attacks=attacks)
        (out / f"audit-{int(time.time())}.json").write_text(json.dumps(rob.to_dict(), indent=2, default=str))
        by_rob.update({v.name: v.to_dict() for v in rob.variants})
    timings["audit"] = time.perf_counter() - t0
    rows = []
    by_prof = {p.name: p for p in prof.variants}
    for v in variants:
        p = by_prof[v.name]
        b1 = next(s for s in p.latency if s.batch == 1)
        r = by_rob.get(v.name)
        e = min(r["eps"], key=lambda e: abs(e["eps"] - args.eps)) if r else None
        rows.append({
            "variant": v.name, "recipe": v.recipe.get("recipe", "float"),
            "bits": v.recipe.get("bits"), "parameters": v.recipe.get("parameters"),
            "accuracy_all_x": p.accuracy, "clean_accuracy_audit": r["clean_accuracy"] if r else None,
            "robust_accuracy": e["robust_accuracy"] if e else None, "upper_bound": r["upper_bound"] if r else None,
            "families": r["families"] if r else None, "size_kib": p.size_bytes / 1024,
            "p50_ms": b1.p50_ms, "p95_ms": b1.p95_ms, "train_seconds": v.recipe.get("train_seconds"),
        })
    base = rows[0]
    for row in rows:
        row["size_ratio_vs_float"] = row["size_kib"] / base["size_kib"]
        row["p50_ratio_vs_float"] = row["p50_ms"] / base["p50_ms"]
    return {"target": args.target, "model": model, "torch_source": source, "data": data, "eps": args.eps,
            "n": args.n, "runs": args.runs, "attacks": attacks or "quick cascade", "audited": [v.name for v in audited], "quant_bits": bits, "profile": cfg["profile"], "seed": args.seed,
            "load_average_start": load_start, "load_average_end": _load(), "seconds": timings,
            "onnxruntime_threads": 1, "rows": rows}


def markdown(res: dict) -> str:
    head = ("| variant | params | clean acc (audit n={n}) | robust acc @ {eps} | acc on all of `x` | file KiB (vs float) "
            "| p50 / p95 batch 1 ms (p50 vs float) |").format(n=res["n"], eps=res["eps"])
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rob = "—" if r["robust_accuracy"] is None else f"{r['robust_accuracy']:.3f}" + (
            " (upper bound)" if r["upper_bound"] else "")
        clean = "—" if r["clean_accuracy_audit"] is None else f"{r['clean_accuracy_audit']:.3f}"
        params = "—" if r["parameters"] is None else f"{r['parameters']:,}"
        lines.append(f"| `{r['variant']}` | {params} | {clean} | {rob} | {r['accuracy_all_x']:.3f} | "
                     f"{r['size_kib']:.1f} ({r['size_ratio_vs_float']:.2f}x) | {r['p50_ms']:.3f} / {r['p95_ms']:.3f} "
                     f"({r['p50_ratio_vs_float']:.2f}x) |")
    lines.append(f"\nload average (1/5/15 min) at start {res['load_average_start']}, at end {res['load_average_end']}; "
                 f"seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=sorted(TARGETS), default="mobilenet")
    ap.add_argument("--cache", default="/tmp/edgeward-bench/ref", help="where the model is built once")
    ap.add_argument("--out", default="/tmp/edgeward-bench/harden", help="harden's output folder")
    ap.add_argument("--recipes", default=None, help="comma-separated (default: every recipe)")
    ap.add_argument("--quant-bits", default="w8a8,w4a8", help="first: every recipe; then the quantization recipes")
    ap.add_argument("--eps", type=float, default=0.1, help="L-inf audit budget (the policy's 0.1 of the range)")
    ap.add_argument("--n", type=int, default=100, help="audit points (0: no robustness audit)")
    ap.add_argument("--runs", type=int, default=200, help="profile runs per batch size")
    ap.add_argument("--attacks", default=None, help="comma-separated audit attacks (default: the quick cascade)")
    ap.add_argument("--also", default=None, help="comma-separated variants an earlier run left in OUT "
                    "(NAME.onnx, NAME.pt, NAME.recipe.json), profiled and audited with this run's")
    ap.add_argument("--audit-from", default=None, help="robustness report JSON of an earlier audit run with the "
                    "same --n/--eps/--seed/--attacks: its variants are not audited again")
    ap.add_argument("--audit-variants", default=None, help="comma-separated variants to audit (default: all)")
    ap.add_argument("--quant-recipes", default="ptq,qat,mixed", help="re-run at each further --quant-bits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="reuse OUT/variants.json when it exists")
    args = ap.parse_args()
    res = run(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(res, indent=2))
    print(markdown(res))


if __name__ == "__main__":
    main()
