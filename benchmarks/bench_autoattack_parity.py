"""Cascade vs **standard AutoAttack** at its published budgets, same model, points and epsilon.

    pip install --no-deps torchattacks==3.5.1   # its metadata pulls torchvision (a CUDA build): never without --no-deps
    PYTHONPATH=. .venv/bin/python benchmarks/bench_autoattack_parity.py [--n 200] [--eps 0.1]

The baseline is torchattacks' port of AutoAttack (Croce & Hein 2020), ``version="standard"``,
with every budget set explicitly to the published protocol: APGD-CE (100 iterations,
1 restart), APGD-T (DLR loss, 100 iterations, 9 target classes or C-1 when fewer),
FAB-T (9 target classes or C-1, 100 iterations), Square (5000 queries, p_init 0.8), each
only on points the previous attacks left. Not ART's AutoAttack defaults (5 restarts of
every attack, batch 32), which is what the old 74x/182x figure was against.

Models: the digits demo CNN (1x8x8, 6 classes), a 3-conv CNN and a ResNet-style residual
CNN on 12x12 digits trained here (5 classes). Both robust accuracies are judged on the same
onnxruntime session. The cascade runs as ``edgeward audit robustness --profile quick`` does
(default attacks, 64-point shards) without its self-check shard; its time per attack is
printed under each row (summed over epsilons and shards).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _standard_autoattack(model, x, y, eps: float, n_classes: int, seed: int = 0):
    import torchattacks
    from torchattacks.attacks.apgd import APGD
    from torchattacks.attacks.apgdt import APGDT
    from torchattacks.attacks.fab import FAB
    from torchattacks.attacks.square import Square
    from torchattacks.wrappers.multiattack import MultiAttack

    targets = min(9, n_classes - 1)
    attacks = [
        APGD(model, eps=eps, norm="Linf", seed=seed, loss="ce", n_restarts=1, steps=100),
        APGDT(model, eps=eps, norm="Linf", seed=seed, n_classes=n_classes, n_restarts=1, steps=100),
        FAB(model, eps=eps, norm="Linf", seed=seed, multi_targeted=True, n_classes=n_classes, n_restarts=1,
            steps=100),
        Square(model, eps=eps, norm="Linf", seed=seed, n_queries=5000, n_restarts=1, p_init=0.8),
    ]
    for a in attacks[1:3]:
        a.n_target_classes = targets
    atk = MultiAttack(attacks)
    t = time.perf_counter()
    x_adv = atk(torch.from_numpy(x), torch.from_numpy(y)).detach().numpy()
    return x_adv, time.perf_counter() - t, torchattacks.__version__


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        out = self.m(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _compare(label, onnx_path, module, data_path, eps, n, seed, profile="quick"):
    from hardening.data import load_dataset
    from hardening.intake import load_model, make_session, predict_logits
    from hardening.robustness import run_robustness_audit

    ds = load_dataset(data_path)
    info = load_model(onnx_path)
    pick = np.sort(np.random.default_rng(seed).choice(len(ds.x), size=min(n, len(ds.x)), replace=False))
    x, y = ds.x[pick], ds.y[pick]
    torch.set_num_threads(1)
    t = time.perf_counter()
    rep = run_robustness_audit([onnx_path], data_path, torch_source=module, eps=[eps], n=n, seed=seed,
                               self_checks=False, profile=profile)
    t_cascade = time.perf_counter() - t
    v = rep.variants[0]
    per_family: dict[str, float] = {}
    for r in v.attacks:
        key = f"{r.family}/{r.attack}"
        per_family[key] = round(per_family.get(key, 0) + r.seconds, 2)
        per_family[f"{key} points"] = per_family.get(f"{key} points", 0) + r.attacked
    sess = make_session(onnx_path)
    x_adv, t_aa, ver = _standard_autoattack(_Logits(module).eval(), x, y, eps, int(info.num_classes), seed)
    x_adv = np.clip(np.clip(x_adv, x - eps, x + eps), 0.0, 1.0).astype(np.float32)
    aa = float(np.mean(predict_logits(sess, info, x_adv).argmax(1) == y))
    print(f"| {label} | {len(x)} | {eps:g} | {v.robust_at(eps).robust_accuracy:.3f} | {aa:.3f} | "
          f"{t_cascade:.1f} s | {t_aa:.1f} s | {t_aa / t_cascade:.1f}x |")
    print(f"    cascade seconds (and points attacked) by stage: {per_family}; torchattacks {ver}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="quick", help="cascade profile: quick or thorough")
    ap.add_argument("--eps-extra", type=float, default=0.05,
                    help="also run the 12x12 CNN here (it has no robust point left at 0.1)")
    args = ap.parse_args()
    from benchmarks._models import CNN3, ResidualCNN, cnn_data, export, train
    from hardening.demo import build_demo
    from hardening.torch_source import load_torch_source

    tmp = Path(tempfile.mkdtemp())
    print(f"cascade profile: {args.profile}")
    print("| model | points | eps | cascade robust acc | standard AutoAttack robust acc | cascade | AutoAttack | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    demo = build_demo("digits", tmp / "digits")
    _compare("digits demo CNN (1x8x8, 6 classes)", demo.model_path, load_torch_source(demo.torch_path),
             demo.data_path, args.eps, args.n, args.seed, args.profile)
    x, y = cnn_data()
    np.savez(tmp / "cnn.npz", x=x, y=y)
    m = train(CNN3(), x, y)
    p = export(m, x, tmp / "cnn.onnx", "image", "out")
    for e in (args.eps, args.eps_extra):
        _compare("3-conv CNN (1x12x12, 5 classes)", str(p), m, str(tmp / "cnn.npz"), e, args.n, args.seed, args.profile)
    r = train(ResidualCNN(), x, y)
    p = export(r, x, tmp / "res.onnx", "image", "out")
    for e in (args.eps, args.eps_extra):
        _compare("residual CNN (1x12x12, 5 classes)", str(p), r, str(tmp / "cnn.npz"), e, args.n, args.seed,
                 args.profile)


if __name__ == "__main__":
    main()
