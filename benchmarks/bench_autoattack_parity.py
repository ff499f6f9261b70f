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
CNN on 12x12 digits trained here (5 classes), and with ``--reference DIR`` a realistic model
built by ``hardening.reference_models.build_reference`` (e.g. MobileNetV3-small 3x96x96). Both robust accuracies are judged on the same
onnxruntime session. The cascade runs as ``edgeward audit robustness --profile quick`` does
(default attacks, 64-point shards) without its self-check shard, on the data set already in
memory (neither side's time includes reading the data file); its time per attack is
printed under each row (summed over epsilons and shards), AutoAttack's per attack, and
every point one side breaks and the other does not (which AutoAttack attack, margins).
``--cache DIR`` keeps AutoAttack's adversarials so cascade changes can be compared quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _standard_autoattack(model, x, y, eps: float, n_classes: int, sess, info, seed: int = 0):
    """Standard AutoAttack, its four attacks in turn, each on the points the deployed session
    still classifies correctly (what ``MultiAttack`` does, judged on the session instead of the
    torch copy); returns adversarials, which attack broke each point ("" if none), seconds."""
    import torchattacks
    from torchattacks.attacks.apgd import APGD
    from torchattacks.attacks.apgdt import APGDT
    from torchattacks.attacks.fab import FAB
    from torchattacks.attacks.square import Square

    from hardening.intake import predict_logits

    targets = min(9, n_classes - 1)
    attacks = [
        ("apgd-ce", APGD(model, eps=eps, norm="Linf", seed=seed, loss="ce", n_restarts=1, steps=100)),
        ("apgd-t", APGDT(model, eps=eps, norm="Linf", seed=seed, n_classes=n_classes, n_restarts=1, steps=100)),
        ("fab-t", FAB(model, eps=eps, norm="Linf", seed=seed, multi_targeted=True, n_classes=n_classes,
                      n_restarts=1, steps=100)),
        ("square", Square(model, eps=eps, norm="Linf", seed=seed, n_queries=5000, n_restarts=1, p_init=0.8)),
    ]
    for _, a in attacks[1:3]:
        a.n_target_classes = targets
    x_adv = x.copy()
    by = np.array([""] * len(x), dtype=object)
    alive = predict_logits(sess, info, x).argmax(1) == y
    by[~alive] = "clean"
    seconds: dict[str, float] = {}
    for name, atk in attacks:
        idx = np.flatnonzero(alive)
        t = time.perf_counter()
        if len(idx):
            cand = atk(torch.from_numpy(x[idx]), torch.from_numpy(y[idx])).detach().numpy()
            cand = np.clip(np.clip(cand, x[idx] - eps, x[idx] + eps), 0.0, 1.0).astype(np.float32)
            hit = predict_logits(sess, info, cand).argmax(1) != y[idx]
            x_adv[idx[hit]] = cand[hit]
            by[idx[hit]] = name
            alive[idx[hit]] = False
        seconds[name] = round(time.perf_counter() - t, 2)
    return x_adv, by, seconds, torchattacks.__version__


def _cached_autoattack(cache: Path | None, key: str, run):
    """AutoAttack's result for ``key`` from ``cache`` (a directory) if it ran before, else run it."""
    if cache is None:
        return run()
    f = cache / f"aa-{key}.npz"
    if f.exists():
        d = np.load(f, allow_pickle=False)
        return d["x_adv"], d["by"].astype(object), json.loads(str(d["seconds"])), str(d["version"]) + " (cached)"
    x_adv, by, seconds, ver = run()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, x_adv=x_adv, by=by.astype(str), seconds=json.dumps(seconds), version=ver)
    return x_adv, by, seconds, ver


def _margin(module, x, y) -> np.ndarray:
    """Logit of the true class minus the best other one (positive: still correct)."""
    with torch.no_grad():
        z = _Logits(module).eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    other = z.copy()
    other[np.arange(len(y)), y] = -np.inf
    return z[np.arange(len(y)), y] - other.max(1)


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        out = self.m(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _compare(label, onnx_path, module, data_path, eps, n, seed, profile="quick", cache=None):
    from hardening.data import load_dataset
    from hardening.intake import load_model, make_session, predict_logits, sha256_file
    from hardening.robustness import run_robustness_audit

    ds = load_dataset(data_path)
    info = load_model(onnx_path)
    pick = np.sort(np.random.default_rng(seed).choice(len(ds.x), size=min(n, len(ds.x)), replace=False))
    x, y = ds.x[pick], ds.y[pick]
    torch.set_num_threads(1)
    t = time.perf_counter()
    rep = run_robustness_audit([onnx_path], ds, torch_source=module, eps=[eps], n=n, seed=seed,
                               self_checks=False, profile=profile)
    t_cascade = time.perf_counter() - t
    v = rep.variants[0]
    per_family: dict[str, float] = {}
    for r in v.attacks:
        key = f"{r.family}/{r.attack}"
        per_family[key] = round(per_family.get(key, 0) + r.seconds, 2)
        per_family[f"{key} points"] = per_family.get(f"{key} points", 0) + r.attacked
    sess = make_session(onnx_path)
    key = f"{sha256_file(onnx_path)[:16]}-{eps:g}-{n}-{seed}"
    x_adv, aa_by, aa_seconds, ver = _cached_autoattack(
        cache, key, lambda: _standard_autoattack(_Logits(module).eval(), x, y, eps, int(info.num_classes), sess,
                                                 info, seed))
    t_aa = float(sum(aa_seconds.values()))
    aa_robust = predict_logits(sess, info, x_adv).argmax(1) == y
    aa = float(np.mean(aa_robust))
    print(f"| {label} | {len(x)} | {eps:g} | {v.robust_at(eps).robust_accuracy:.3f} | {aa:.3f} | "
          f"{t_cascade:.1f} s | {t_aa:.1f} s | {t_aa / t_cascade:.1f}x |")
    print(f"    cascade seconds (and points attacked) by stage: {per_family}; AutoAttack seconds by attack: "
          f"{aa_seconds}; torchattacks {ver}; load average {os.getloadavg()[0]:.1f}", flush=True)
    # per point: which points one side breaks and the other does not, and how close they were
    row = {int(e.index): e for e in v.examples}
    ours = np.array([row[int(i)].correct and row[int(i)].broken_at_eps is None for i in pick])
    clean_m = _margin(module, x, y)
    for j in np.flatnonzero(ours & ~aa_robust):
        print(f"    AutoAttack only: row {int(pick[j])} broken by {aa_by[j]}, clean margin {clean_m[j]:.3f}, "
              f"margin at its adversarial {float(_margin(module, x_adv[j:j + 1], y[j:j + 1])[0]):.3f}")
    only_ours = np.flatnonzero(~ours & aa_robust)
    if len(only_ours):
        print(f"    cascade only: {len(only_ours)} points (broken by "
              f"{sorted({str(row[int(pick[j])].broken_by) for j in only_ours})})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="quick", help="cascade profile: quick or thorough")
    ap.add_argument("--eps-extra", type=float, default=0.05,
                    help="also run the 12x12 CNNs here (the 3-conv CNN has no robust point left at 0.1)")
    ap.add_argument("--models", default="digits,cnn,residual", help="comma-separated subset of digits,cnn,residual")
    ap.add_argument("--cache", type=Path, default=None,
                    help="directory keeping AutoAttack's adversarials per (model digest, eps, n, seed): reruns "
                         "compare against them and report the time AutoAttack took when it ran")
    ap.add_argument("--reference", type=Path, default=None,
                    help="also a realistic model: a directory written by hardening.reference_models.build_reference "
                         "(model.onnx, model.ts, data.npz), e.g. MobileNetV3-small 3x96x96")
    args = ap.parse_args()
    from benchmarks._models import CNN3, ResidualCNN, cnn_data, export, train
    from hardening.demo import build_demo
    from hardening.torch_source import load_torch_source

    models = set(args.models.split(","))
    tmp = Path(tempfile.mkdtemp())
    print(f"cascade profile: {args.profile}")
    print("| model | points | eps | cascade robust acc | standard AutoAttack robust acc | cascade | AutoAttack | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    if "digits" in models:
        demo = build_demo("digits", tmp / "digits")
        _compare("digits demo CNN (1x8x8, 6 classes)", demo.model_path, load_torch_source(demo.torch_path),
                 demo.data_path, args.eps, args.n, args.seed, args.profile, args.cache)
    x, y = cnn_data()
    np.savez(tmp / "cnn.npz", x=x, y=y)
    for name, cls, label in (("cnn", CNN3, "3-conv CNN (1x12x12, 5 classes)"),
                             ("residual", ResidualCNN, "residual CNN (1x12x12, 5 classes)")):
        if name not in models:
            continue
        m = train(cls(), x, y)
        p = export(m, x, tmp / f"{name}.onnx", "image", "out")
        for e in (args.eps, args.eps_extra):
            _compare(label, str(p), m, str(tmp / "cnn.npz"), e, args.n, args.seed, args.profile, args.cache)
    if args.reference is not None:
        d = args.reference
        _compare(f"reference model {d.name} (3-D input)", str(d / "model.onnx"), load_torch_source(d / "model.ts"),
                 str(d / "data.npz"), args.eps, args.n, args.seed, args.profile, args.cache)


if __name__ == "__main__":
    main()
