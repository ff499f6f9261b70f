"""OOD gate benchmark on the digits demo: detector x family table and batch-1 scoring cost.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_ood.py [--demo-dir DIR] [--runs 2000]

Prints markdown: achieved FRR per target alpha, AUROC and accepted@FRR per
detector x family, and the runtime scorer's cost per input at batch 1 next to
the model's own onnxruntime inference time, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from hardening.data import load_dataset  # noqa: E402
from hardening.ood import audit_ood, fit_ood  # noqa: E402
from hardening.ood.budget import PREVIOUS, GateBudget  # noqa: E402
from hardening.ood.calibration import CalibrationTooSmall  # noqa: E402
from hardening.ood.pipeline import prepare_model  # noqa: E402
from runtime_guard.anomaly import AnomalyScorer  # noqa: E402


def _demo(demo_dir: str | None) -> tuple[str, str, str]:
    if demo_dir:
        d = Path(demo_dir)
    else:
        from hardening.demo import build_demo

        d = Path(tempfile.mkdtemp(prefix="bench_ood_")) / "digits"
        build_demo("digits", d)
    src = d / "model.pt" if (d / "model.pt").exists() else d / "model.ts"  # state dict or TorchScript
    return str(d / "model.onnx"), str(d / "data.npz"), str(src)


def _per_call(fn, runs: int) -> float:
    for _ in range(50):
        fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(runs // 5):
            fn()
        ts.append((time.perf_counter() - t) / (runs // 5))
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-dir", help="Folder with model.onnx, data.npz, model.pt or model.ts (default: build the digits "
                    "demo; e.g. build_reference's MobileNetV3-small)")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--previous-budget", action="store_true", help="fit at the previous release's gate budget "
                    "(1024 input values, 2^17 per matrix) instead of GateBudget()'s defaults")
    ap.add_argument("--input-values", type=int, help="GateBudget.input_values (overrides the budget's)")
    ap.add_argument("--matrix-values", type=int, help="GateBudget.matrix_values (overrides the budget's)")
    args = ap.parse_args()
    budget = PREVIOUS if args.previous_budget else GateBudget()
    budget = GateBudget(args.input_values or budget.input_values, args.matrix_values or budget.matrix_values)
    model, data, torch_src = _demo(args.demo_dir)
    work = Path(tempfile.mkdtemp(prefix="bench_ood_out_"))

    print(f"gate budget: {budget}\n")
    print(f"## Achieved false-rejection rate on held-out x ({model})\n")
    print("| target alpha | threshold | k / n (conformal) | achieved FRR | distance to target |")
    print("|---|---|---|---|---|")
    for alpha in (0.01, 0.05, 0.10):
        try:
            r = fit_ood(model, data, work / f"det_{alpha}", alpha=alpha, budget=budget)
        except CalibrationTooSmall as e:  # the demo's calibration half is too small for 1%
            print(f"| {alpha:.2f} | refused (exit 2) | {e} | | |")
            continue
        thr = "+inf" if r.threshold is None else f"{r.threshold:.3f}"
        print(f"| {alpha:.2f} | {thr} | {r.conformal_k} / {r.n_threshold} | {r.heldout_frr:.3f} ({r.n_heldout} inputs) | {abs(r.heldout_frr - alpha) * 100:.1f} pts |")

    audit = audit_ood(model, data, work / "det_0.05", work / "audit", torch_source=torch_src, adv_eps=0.3)
    dets = audit.detectors
    for title, attr, fmt in (("AUROC (OOD = positive class)", "auroc", "{:.3f}"),
                             ("accepted@FRR: share of OOD let through at target FRR 0.05", "accepted_at_frr", "{:.3f}")):
        print(f"\n## {title}\n")
        print("| family | n | " + " | ".join(dets) + " |")
        print("|---|---|" + "---|" * len(dets))
        for f in audit.families:
            cells = []
            for d in dets:
                v = getattr(audit.get(f, d), attr)
                bad = (v < 0.97) if attr == "auroc" else (v > 0.10)
                cells.append(("**" + fmt.format(v) + "**") if bad else fmt.format(v))
            print(f"| {f} | {audit.get(f).n_ood} | " + " | ".join(cells) + " |")
    print("\nbold = AUROC < 0.97, or more than 10% of the OOD family accepted")

    # how strong must FGSM be before the gate sees it? (ensemble only)
    from hardening.ood.evaluate import family_metrics
    from hardening.ood.families import fgsm_family

    ds = load_dataset(data)
    scorer = AnomalyScorer.load(work / "det_0.05")
    pm = prepare_model(model, ds, input_view=scorer.input_view)
    print(f"\ninput view: {scorer.meta.get('input_view')}; budget: {scorer.meta.get('budget')}")

    def fused(x: np.ndarray) -> np.ndarray:
        v = pm.outputs(x)  # raw inputs: the runtime scorer applies the compact view itself
        return scorer.score(v.input, v.logits, v.features)

    id_s = fused(ds.x)
    print("\n## FGSM strength sweep (ensemble, eps as a fraction of the value range)\n")
    print("| eps | model accuracy on FGSM inputs | ensemble AUROC | accepted@FRR 0.05 |")
    print("|---|---|---|---|")
    for eps in (0.05, 0.1, 0.2, 0.3):
        adv = fgsm_family(torch_src, ds, eps, pm.info.num_classes)
        acc = float((pm.views(adv).logits.argmax(1) == ds.y).mean())
        m = family_metrics(f"fgsm{eps}", "ensemble", id_s, fused(adv), scorer.threshold)
        print(f"| {eps:g} | {acc:.3f} | {m.auroc:.3f} | {m.accepted_at_frr:.3f} |")

    # batch-1 cost: model inference vs runtime anomaly scoring (same process, same inputs)
    from hardening.intake import make_session

    sess = make_session(pm.model_bytes, threads=1)
    x1 = ds.x[:1]
    names = [pm.info.logits_output, pm.features_output]
    logits, feats = sess.run(names, {pm.info.input_name: x1})
    t_model = _per_call(lambda: sess.run(names, {pm.info.input_name: x1}), args.runs)
    t_score = _per_call(lambda: scorer.score(x1, logits, feats), args.runs)
    by_det = {}
    views = scorer.view_arrays(x1, logits, feats)
    by_det["views (checks + compact input view)"] = _per_call(lambda: scorer.view_arrays(x1, logits, feats), args.runs)
    for d in scorer.detectors:
        by_det[f"detector {d.name} alone"] = _per_call(lambda d=d: d.raw(views[d.view]), args.runs)
    print("\n## Batch-1 cost (1 intra-op thread)\n")
    print("| step | us / input | ratio to model inference |")
    print("|---|---|---|")
    print(f"| onnxruntime model inference (logits + features) | {t_model * 1e6:.1f} | 1.00 |")
    print(f"| AnomalyScorer.score (all detectors + fusion) | {t_score * 1e6:.1f} | {t_score / t_model:.2f} |")
    for name, t in by_det.items():
        print(f"| &nbsp; {name} | {t * 1e6:.1f} | {t / t_model:.2f} |")


if __name__ == "__main__":
    main()
