"""Extraction demo tables: fidelity vs queries for every scenario x victim, time to steal, honest-user cost.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_extraction.py --demo /tmp/demo/digits \
        --budgets 50,200,1000,5000 --out /tmp/extraction-bench

Prints Markdown (paste into benchmarks/results/extraction.md) and writes the JSON report and PNGs to --out.
Builds the digits demo into --out if --demo is not given.

Thief sweep (issue 15): the default thief against main a1f707f's, side by side in one run, on
the bare model with in-distribution data at the quick profile's settings (what the self-check
judges), per seed, with each thief's training wall time:

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_extraction.py --sweep \
        /tmp/gate/cache/mnv3 /tmp/gate/cache/digits --budgets 50,200,500 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _f(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _h(h) -> str:
    if h is None:
        return "not reached"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.2f} h"


def markdown(rep) -> str:
    lines = [f"Model `{Path(rep.model).name}` sha256 `{rep.model_sha256[:12]}`; thief `{rep.thief['arch']}` "
             f"({rep.thief['train_steps']} steps, batch {rep.thief['batch_size']}); rate {rep.rate['per_client']} "
             f"per key, {rep.rate['sybil_keys']} Sybil keys, global {rep.rate['global_limit']}.",
             "Pools: " + "; ".join(f"{p['scenario']}: {p['n_real']} real + {p['n_augmented']} augmented"
                                    for p in rep.pools), ""]
    if rep.gate:
        lines.append(f"OOD gate: target FRR {rep.gate['alpha']}, held-out FRR {rep.gate['heldout_frr']:.3f}, "
                     f"fused {', '.join(rep.gate['fused'])}.\n")
    head = ["scenario", "victim", "attack", *[str(b) for b in rep.budgets], "q90", "q95", "time to 90% (1 key)",
            f"({rep.rate['sybil_keys']} keys)", "PRADA first flag"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in rep.curves:
        row = [c.scenario, c.victim, c.attack, *[_f(f) for f in c.fidelity], _f(c.queries_to_90),
               _f(c.queries_to_95), _h(c.hours_to_90_one_key), _h(c.hours_to_90_sybil), _f(c.first_flagged_at)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Queries answered / rejected at the largest budget (guarded and adaptive victims):", "",
              "| scenario | victim | attack | sent | answered | rejected | flagged | trained on |", "|---|---|---|---|---|---|---|---|"]
    top = max(rep.budgets)
    for r in rep.runs:
        if r.budget == top and r.victim in ("guarded", "adaptive_misinformation"):
            lines.append(f"| {r.scenario} | {r.victim} | {r.attack} | {r.queries_sent} | {r.answered} | {r.rejected} "
                         f"| {r.flagged} | {r.trained_on} |")
    lines += ["", "Which defence stops which thief (vs bare, same scenario and attack). stops = bare reaches 90% "
              "fidelity on the grid, this victim never does; degrades = fidelity at the largest budget >= 0.10 "
              "lower; slows = 90% reached at a larger budget:", "",
              "| scenario | attack | victim | fidelity @max | bare @max | q90 | bare q90 | effect |",
              "|---|---|---|---|---|---|---|---|"]
    for v in rep.verdicts:
        lines.append(f"| {v.scenario} | {v.attack} | {v.victim} | {v.fidelity_at_max:.3f} | "
                     f"{v.bare_fidelity_at_max:.3f} | {_f(v.queries_to_90)} | {_f(v.bare_queries_to_90)} | {v.effect} |")
    lines += ["", "Honest users (test split):", "", "| victim | accuracy | top-1 changed | rejected | flagged |",
              "|---|---|---|---|---|"]
    for b in rep.benign:
        lines.append(f"| {b.victim} | {b.accuracy:.3f} | {b.top1_changed:.3f} | {b.rejection_rate:.3f} | {b.flagged_rate:.3f} |")
    lines += ["", "Top-1 changed or made ambiguous for honest users (ART postprocessors vs runtime policies):", "",
              "| source | transform | params | test split | OOD family |", "|---|---|---|---|---|"]
    for p in rep.postprocessors:
        lines.append(f"| {p.source} | {p.name} | `{json.dumps(p.params)}` | {p.top1_changed:.3f} | "
                     f"{_f(getattr(p, 'top1_changed_ood', None))} |")
    lines += ["", f"Self-check: {'PASS' if rep.self_check.passed else 'FAIL'} ({rep.self_check.message}). "
              f"Wall time {rep.seconds:.0f} s."]
    return "\n".join(lines)


def from_json(path: str):
    """Re-render a saved extraction.json (older runs lack 'verdicts': they are recomputed from the curves)."""
    from types import SimpleNamespace

    from hardening.extraction_audit import Curve, verdicts

    d = json.loads(Path(path).read_text())
    ns = lambda items: [SimpleNamespace(**i) for i in items]  # noqa: E731
    curves = [Curve(**c) for c in d["curves"]]
    return SimpleNamespace(**{**d, "curves": curves, "runs": ns(d["runs"]), "benign": ns(d["benign"]),
                              "postprocessors": ns(d["postprocessors"]), "self_check": SimpleNamespace(**d["self_check"]),
                              "verdicts": verdicts(curves)})


def baseline_spec(spec):
    """The default thief of main a1f707f: ``image_cnn`` with three blocks and global pooling
    (stem stride kept), Adam at a constant learning rate; other families unchanged but constant."""
    import dataclasses

    if spec.arch == "image_cnn":
        kw = {k: spec.kwargs[k] for k in ("in_channels", "num_classes", "stem_stride")}
        spec = dataclasses.replace(spec, kwargs=kw)
    return dataclasses.replace(spec, lr_schedule="constant")


def sweep(model_dir: Path, budgets: list[int], seeds: list[int], attacks: list[str], steps: int) -> list[dict]:
    """Fidelity of each budget's stolen copy (bare victim, in_dist pool, one fresh thief per run)."""
    import torch

    from attacks.extraction import steal, thief_spec_for
    from attacks.thief_data import make_pool
    from hardening.data import load_dataset
    from hardening.extraction_audit import _thief_data, build_victims
    from hardening.intake import check_fits, load_model, make_session

    torch.set_num_threads(1)
    info, ds = load_model(model_dir / "model.onnx"), load_dataset(model_dir / "data.npz")
    check_fits(info, ds)
    src = next((p for p in (model_dir / "model.pt", model_dir / "model.ts") if p.is_file()), None)
    bare = build_victims(["bare"], make_session(model_dir / "model.onnx"), info, ds.sample_shape)["bare"]
    raw = bare.labels(ds.x)  # type: ignore[attr-defined]
    new = thief_spec_for(ds.sample_shape, info.num_classes, src, train_steps=steps)
    rows = []
    for seed in seeds:
        pool = make_pool("in_dist", max(budgets), ds.sample_shape, ds.value_range, _thief_data(ds, ["in_dist"])[0],
                         seed=seed, n_actions=info.num_classes)
        for name, spec in (("main a1f707f", baseline_spec(new)), ("this branch", new)):
            for attack in attacks:
                for b in budgets:
                    bare.new_attacker(f"sweep-{seed}-{attack}-{b}")
                    stolen = steal(bare, pool.x[:b], attack, spec, pool.actions[:b], seed=seed)
                    rows.append({"model": model_dir.name, "shape": "x".join(map(str, ds.sample_shape)), "thief": name,
                                 "spec": spec.to_dict(), "attack": attack, "seed": seed, "budget": b,
                                 "fidelity": float((stolen.predict_labels(ds.x) == raw).mean()),
                                 "seconds": round(stolen.seconds, 2)})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    """Mean (min-max over seeds) fidelity per budget and mean training seconds, per model x attack x thief."""
    import numpy as np

    budgets = sorted({r["budget"] for r in rows})
    lines = ["| model | input | attack | thief | " + " | ".join(f"fidelity @{b}" for b in budgets)
             + " | s per thief @max | seeds |", "|" + "---|" * (len(budgets) + 6)]
    keys = list(dict.fromkeys((r["model"], r["shape"], r["attack"], r["thief"]) for r in rows))
    for key in keys:
        rs = [r for r in rows if (r["model"], r["shape"], r["attack"], r["thief"]) == key]
        cells = []
        for b in budgets:
            f = np.array([r["fidelity"] for r in rs if r["budget"] == b])
            cells.append(f"{f.mean():.3f} ({f.min():.3f}-{f.max():.3f})")
        secs = np.mean([r["seconds"] for r in rs if r["budget"] == budgets[-1]])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells)
                     + f" | {secs:.1f} | {len({r['seed'] for r in rs})} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", help="folder with model.onnx, model.pt, data.npz (default: build the digits demo)")
    ap.add_argument("--budgets", default="50,200,1000,5000")
    ap.add_argument("--policies", default=None)
    ap.add_argument("--scenarios", default=None)
    ap.add_argument("--attacks", default="copycat,knockoff_random")
    ap.add_argument("--rate-limit", default="60/minute")
    ap.add_argument("--sybil-keys", type=int, default=10)
    ap.add_argument("--out", default="extraction-bench")
    ap.add_argument("--render", help="print the Markdown of a saved extraction.json and exit")
    ap.add_argument("--sweep", nargs="+", metavar="DIR",
                    help="thief sweep: model folders (model.onnx, data.npz, optional model.pt/model.ts)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-steps", type=int, default=150, help="thief steps (sweep; 150 = the quick profile)")
    args = ap.parse_args()
    if args.render:
        print(markdown(from_json(args.render)))
        return
    if args.sweep:
        t0 = time.perf_counter()
        rows = [r for d in args.sweep for r in sweep(Path(d), [int(b) for b in args.budgets.split(",")],
                                                     [int(s) for s in args.seeds.split(",")],
                                                     args.attacks.split(","), args.train_steps)]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "thief_sweep.json").write_text(json.dumps(rows, indent=1))
        print(sweep_markdown(rows))
        print(f"\n(total {time.perf_counter() - t0:.0f} s)")
        return

    from attacks.thief_data import SCENARIOS
    from hardening.cli.common import dumps
    from hardening.extraction_audit import VICTIMS, run_extraction_audit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        demo = Path(args.demo)
    else:
        from hardening.demo import build_demo

        demo = Path(build_demo("digits", out / "demo").model_path).parent
    t0 = time.perf_counter()
    rep = run_extraction_audit(
        demo / "model.onnx", demo / "data.npz", torch_source=demo / "model.pt",
        budgets=[int(b) for b in args.budgets.split(",")],
        scenarios=args.scenarios.split(",") if args.scenarios else SCENARIOS,
        policies=args.policies.split(",") if args.policies else VICTIMS,
        attacks=args.attacks.split(","), rate_limit=args.rate_limit, sybil_keys=args.sybil_keys,
        plot_dir=out, progress=lambda d, t, label: print(f"[{d}/{t}] {label}", file=sys.stderr, flush=True),
    )
    (out / "extraction.json").write_text(dumps(rep.to_dict()))
    print(markdown(rep))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
