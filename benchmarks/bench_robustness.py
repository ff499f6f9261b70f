"""Ensemble vs ART AutoAttack on the same model, data and epsilon (digits CNN, L-inf).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_robustness.py [--n 200] [--eps 0.1] [--profile quick]

Prints both robust accuracies (judged on the same onnxruntime session) and wall
times side by side; the ensemble must be no less strong and much faster. Also prints
the float vs static-int8 robust-accuracy-vs-epsilon table (``--table``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch


def _demo(out: Path):
    from hardening.demo import build_demo

    return build_demo("digits", out)


def run_autoattack(model_path, torch_path, x, y, eps: float) -> tuple[float, float]:
    """ART AutoAttack with its default attacks and settings; robust accuracy on ORT."""
    if "multiprocess" not in sys.modules:
        try:
            import multiprocess  # noqa: F401
        except ImportError:  # only the parallel path uses it; we run parallel_pool_size=0
            sys.modules["multiprocess"] = types.ModuleType("multiprocess")
    from art.attacks.evasion import AutoAttack

    from attacks.estimators import torch_classifier
    from hardening.intake import load_model, make_session, predict_logits
    from hardening.torch_source import load_torch_source

    est = torch_classifier(load_torch_source(torch_path), x.shape[1:], 6, (0.0, 1.0))
    np.random.seed(0)
    torch.manual_seed(0)
    t = time.perf_counter()
    x_adv = AutoAttack(est, norm=np.inf, eps=eps).generate(x, y=y)
    seconds = time.perf_counter() - t
    x_adv = np.clip(np.clip(x_adv, x - eps, x + eps), 0.0, 1.0).astype(np.float32)
    info = load_model(model_path)
    acc = float(np.mean(predict_logits(make_session(model_path), info, x_adv).argmax(1) == y))
    return acc, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--demo", default=None, help="existing digits demo dir (else built in a temp dir)")
    ap.add_argument("--table", action="store_true", help="also print float vs int8 robust accuracy vs epsilon")
    ap.add_argument("--skip-autoattack", action="store_true")
    ap.add_argument("--masked", action="store_true", help="also audit a gradient-masked copy vs the plain model")
    args = ap.parse_args()
    torch.set_num_threads(1)  # same single-threaded setting for both contenders
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)

    from hardening.data import load_dataset
    from hardening.robustness import run_robustness_audit

    tmp = Path(tempfile.mkdtemp(prefix="bench_rob_"))
    if args.demo:
        d = Path(args.demo)
        model, tsrc, data = d / "model.onnx", d / "model.pt", d / "data.npz"
    else:
        demo = _demo(tmp / "digits")
        model, tsrc, data = Path(demo.model_path), Path(demo.torch_path), Path(demo.data_path)

    # warm-up (imports ART's attack modules, first torch/ORT calls) so neither side pays it in its timing
    run_robustness_audit([model], data, torch_source=tsrc, eps=[args.eps], n=4, attacks=["fgsm"], self_checks=False)
    t = time.perf_counter()
    rep = run_robustness_audit([model], data, torch_source=tsrc, profile=args.profile, eps=[args.eps], n=args.n,
                               self_checks=False)
    ens_s = time.perf_counter() - t
    v = rep.variants[0]
    ens_acc = v.eps[0].robust_accuracy
    print(f"ensemble ({args.profile}, no self-checks): robust acc {ens_acc:.4f} "
          f"[{v.eps[0].ci_low:.3f}, {v.eps[0].ci_high:.3f}] in {ens_s:.1f} s  (clean {v.clean_accuracy:.4f})")
    t = time.perf_counter()
    run_robustness_audit([model], data, torch_source=tsrc, profile=args.profile, eps=[args.eps], n=args.n)
    print(f"ensemble ({args.profile}, with self-checks): {time.perf_counter() - t:.1f} s")

    if not args.skip_autoattack:
        ds = load_dataset(data)
        idx = np.array([e.index for e in v.examples])
        aa_acc, aa_s = run_autoattack(model, tsrc, ds.x[idx], ds.y[idx], args.eps)
        print(f"ART AutoAttack (defaults): robust acc {aa_acc:.4f} in {aa_s:.1f} s")
        print(f"ratio: ensemble/AutoAttack robust acc {ens_acc:.4f} <= {aa_acc:.4f}: {ens_acc <= aa_acc}; "
              f"speed-up {aa_s / ens_s:.1f}x")

    if args.table:
        from hardening.compression import compress

        variants = compress(model, data, tmp / "variants", torch_source=tsrc, kinds=("float", "int8_static"))
        t = time.perf_counter()
        rep = run_robustness_audit(variants, data, profile=args.profile, eps=[0.02, 0.05, 0.1, 0.15, 0.2, 0.3],
                                   n=args.n)
        print(f"\nfloat vs int8_static, L-inf, n={rep.n}, {time.perf_counter() - t:.1f} s")
        fams = ["white-box", "bpda", "transfer", "black-box", "decision"]
        print("| variant | eps | clean | " + " | ".join(f"after {f}" for f in fams) + " | robust (worst case) | 95% CI |")
        print("|---" * (5 + len(fams)) + "|")
        for vr in rep.variants:
            for e in vr.eps:
                cells = [f"{e.robust_after_family[f]:.3f}" if f in e.robust_after_family else "-" for f in fams]
                print(f"| {vr.name} | {e.eps:g} | {vr.clean_accuracy:.3f} | " + " | ".join(cells)
                      + f" | **{e.robust_accuracy:.3f}** | [{e.ci_low:.3f}, {e.ci_high:.3f}] |")
        for f in rep.findings:
            print(f"finding: {f.severity} {f.code} {f.variant}: {f.message}")

    if args.masked:
        masked_vs_plain(model, tsrc, data, tmp, args.n, args.profile)


def masked_vs_plain(model, tsrc, data, out: Path, n: int, profile: str) -> None:
    from hardening.data import load_dataset
    from hardening.robustness import run_robustness_audit
    from hardening.robustness.masking import RoundInput
    from hardening.torch_source import export_onnx, load_torch_source

    module = RoundInput(load_torch_source(tsrc)).eval()
    path = out / "masked.onnx"
    export_onnx(module, torch.from_numpy(load_dataset(data).x[:2]), path)
    eps = [0.05, 0.1, 0.2]
    t = time.perf_counter()
    rm = run_robustness_audit([path], data, torch_source=module, profile=profile, eps=eps, n=n)
    ru = run_robustness_audit([model], data, torch_source=tsrc, profile=profile, eps=eps, n=n)
    print(f"\nmasked (round to 1/16) vs plain digits CNN, L-inf, n={n}, {time.perf_counter() - t:.1f} s")
    print("| model | eps | clean | after white-box (cumulative) | robust (worst case) | 95% CI |")
    print("|---|---|---|---|---|---|")
    for rep in (rm, ru):
        vr = rep.variants[0]
        for e in vr.eps:
            print(f"| {vr.name} | {e.eps:g} | {vr.clean_accuracy:.3f} | {e.robust_after_family['white-box']:.3f} | "
                  f"**{e.robust_accuracy:.3f}** | [{e.ci_low:.3f}, {e.ci_high:.3f}] |")
        for f in rep.findings:
            print(f"finding: {f.severity} {f.code} {f.variant}: {f.message}")


if __name__ == "__main__":
    main()
