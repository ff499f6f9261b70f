"""Fusion rules of the OOD gate side by side: per-family AUROC of each rule on the same
fitted detectors (digits demo), so the shipped rule is the one no family regresses under.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_fusion.py [--demo-dir DIR]

Rules are those of ``runtime_guard.anomaly.fuse_z`` (formulas in that module's docstring).
AUROC does not depend on the threshold, so one fit serves every rule.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from hardening.data import load_dataset  # noqa: E402
from hardening.ood import fit_ood  # noqa: E402
from hardening.ood.budget import PREVIOUS, GateBudget  # noqa: E402
from hardening.ood.evaluate import family_metrics  # noqa: E402
from hardening.ood.families import build_families  # noqa: E402
from hardening.ood.pipeline import prepare_model  # noqa: E402
from runtime_guard.anomaly import FUSION_RULES, AnomalyScorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", help="folder with model.onnx, data.npz, model.pt or model.ts (default: build the digits demo)")
    ap.add_argument("--adv-eps", type=float, default=0.3)
    ap.add_argument("--previous-budget", action="store_true", help="fit at the previous release's gate budget "
                    "(1024 input values, 2^17 per matrix) instead of GateBudget()'s defaults")
    ap.add_argument("--input-values", type=int, help="GateBudget.input_values (overrides the budget's)")
    ap.add_argument("--matrix-values", type=int, help="GateBudget.matrix_values (overrides the budget's)")
    args = ap.parse_args()
    budget = PREVIOUS if args.previous_budget else GateBudget()
    budget = GateBudget(args.input_values or budget.input_values, args.matrix_values or budget.matrix_values)
    if args.demo_dir:
        d = Path(args.demo_dir)
    else:
        from hardening.demo import build_demo

        d = Path(tempfile.mkdtemp(prefix="bench_fusion_")) / "digits"
        build_demo("digits", d)
    src = d / "model.pt" if (d / "model.pt").exists() else d / "model.ts"
    model, data, torch_src = str(d / "model.onnx"), str(d / "data.npz"), str(src)
    work = Path(tempfile.mkdtemp(prefix="bench_fusion_out_"))
    fit_ood(model, data, work / "det", alpha=0.05, budget=budget)
    scorer = AnomalyScorer.load(work / "det")
    ds = load_dataset(data)
    pm = prepare_model(model, ds)
    fams = build_families(ds, num_classes=pm.info.num_classes or int(ds.y.max()) + 1,
                          torch_source=torch_src, adv_eps=args.adv_eps)

    def raw(x: np.ndarray) -> dict[str, np.ndarray]:
        v = pm.outputs(x)  # raw inputs: the runtime scorer applies the compact view itself
        return scorer.scores_by_detector(v.input, v.logits, v.features)

    id_raw = raw(ds.x)
    fam_raw = {f: raw(x) for f, x in fams.items()}
    table: dict[str, dict[str, float]] = {}
    for rule in FUSION_RULES:
        scorer.rule = rule
        id_s = scorer.fuse(id_raw)
        table[rule] = {f: family_metrics(f, rule, id_s, scorer.fuse(s), np.inf).auroc for f, s in fam_raw.items()}
    members = ", ".join(d.name for d in scorer.detectors if d.name in scorer.meta["fusion"]["members"])
    print(f"gate budget: {scorer.meta.get('budget')}; input view: {scorer.meta.get('input_view')}\n")
    print(f"## Fused-gate AUROC per family and fusion rule (members: {members})\n")
    print("| family | n | " + " | ".join(FUSION_RULES) + " |")
    print("|---|---|" + "---|" * len(FUSION_RULES))
    for f, x in fams.items():
        print(f"| {f} | {len(x)} | " + " | ".join(f"{table[r][f]:.4f}" for r in FUSION_RULES) + " |")
    print("| **min over families** | | " + " | ".join(f"{min(table[r].values()):.4f}" for r in FUSION_RULES) + " |")


if __name__ == "__main__":
    main()
