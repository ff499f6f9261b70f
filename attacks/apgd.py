"""Auto-PGD (Croce & Hein 2020) in batched torch: APGD-CE, APGD-DLR and targeted APGD-DLR.

Why not ART's ``AutoProjectedGradientDescent`` (art 1.x): it returns the *last* iterate of
each run rather than the best point it visited, computes the DLR loss with a Python loop
per sample, offers no targeted DLR (its targeted mode is cross-entropy towards the
target, weaker than AutoAttack's APGD-T), and keeps iterating on points it has already
broken. This follows the reference implementation (auto-attack's ``apgd_attack_single_run``):
momentum 0.75, per-point step sizes halved at the checkpoints
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` when the loss stopped improving,
restarts from the best point. Additionally a point leaves the batch as soon as the
model misclassifies it (its adversarial is kept), so later iterations cost only what is
still robust. Whether it is adversarial for the deployed model is decided by the caller.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def _checkpoints(n_iter: int) -> list[int]:
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * n_iter) for v in p[1:]})


def _dlr(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Difference-of-logits-ratio loss per point (to maximise): scale- and shift-invariant."""
    zs, _ = z.sort(dim=1)
    zy = z.gather(1, y[:, None])[:, 0]
    if target is None:
        other = z.clone()
        other.scatter_(1, y[:, None], -float("inf"))
        return -(zy - other.max(1).values) / (zs[:, -1] - zs[:, -3] + 1e-12)
    zt = z.gather(1, target[:, None])[:, 0]
    return -(zy - zt) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def _loss(z, y, loss: str, target):
    if loss == "ce":
        return nn.functional.cross_entropy(z, y, reduction="none")
    return _dlr(z, y, target)


def _project(x_adv, x, eps, norm, lo, hi):
    d = x_adv - x
    if norm == np.inf:
        d = d.clamp(-eps, eps)
    else:
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = d * (eps / n).clamp(max=1.0).view(-1, *([1] * (d.ndim - 1)))
    return (x + d).clamp(lo, hi)


def _step(g, step, norm):
    if norm == np.inf:
        return step * g.sign()
    n = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.ndim - 1)))
    return step * g / n


def apgd(model: nn.Module, x: np.ndarray, y: np.ndarray, eps: float, norm: float, n_iter: int,
         clip: tuple[float, float], loss: str = "ce", target: np.ndarray | None = None, restarts: int = 1,
         seed: int = 0) -> np.ndarray:
    """Adversarial candidates for ``x`` (the input itself where no run misclassified it).

    ``loss``: "ce" or "dlr"; with ``target`` (one class per point) the targeted DLR loss.
    """
    lo, hi = float(clip[0]), float(clip[1])
    g = torch.Generator().manual_seed(int(seed))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    tt = None if target is None else torch.from_numpy(np.asarray(target, dtype=np.int64))
    out = xt.clone()
    open_ = torch.ones(len(x), dtype=torch.bool)
    checks = _checkpoints(n_iter)
    for _ in range(max(1, int(restarts))):
        idx = torch.nonzero(open_).flatten()
        if not len(idx):
            break
        hit = _run(model, xt[idx], yt[idx], None if tt is None else tt[idx], eps, norm, n_iter, lo, hi, loss,
                   checks, g)
        found = hit[1]
        out[idx[found]] = hit[0][found]
        open_[idx[found]] = False
    return out.numpy()


def _grad(model, x, y, loss, target):
    x = x.clone().requires_grad_(True)
    z = model(x)
    if isinstance(z, (tuple, list)):
        z = z[0]
    lv = _loss(z, y, loss, target)
    (grad,) = torch.autograd.grad(lv.sum(), x)
    return lv.detach(), grad.detach().contiguous(), z.detach().argmax(1) != y  # an expanded grad cannot be written into


def _run(model, x, y, target, eps, norm, n_iter, lo, hi, loss, checks, g):  # noqa: C901 - the algorithm
    n = len(x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    if norm == np.inf:
        x_adv = x + eps * (2 * torch.rand(x.shape, generator=g) - 1)
    else:
        d = torch.randn(x.shape, generator=g)
        x_adv = x + eps * d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
    x_adv = _project(x_adv, x, eps, norm, lo, hi)
    best_adv = x.clone()
    broken = torch.zeros(n, dtype=torch.bool)
    lv, grad, wrong = _grad(model, x_adv, y, loss, target)
    best_adv[wrong] = x_adv[wrong]
    broken |= wrong
    step = torch.full((n,), 2.0 * eps)
    x_best, loss_best, grad_best = x_adv.clone(), lv.clone(), grad.clone()
    x_prev = x_adv.clone()
    incr = torch.zeros(n)
    loss_at_check = loss_best.clone()
    step_at_check = step.clone()
    last_check = 0
    for k in range(n_iter):
        act = torch.nonzero(~broken).flatten()  # early stop: only points still classified correctly
        if not len(act):
            break
        xa, xo, gr = x_adv[act], x[act], grad[act]
        z1 = _project(xa + _step(gr, step[act].view(shape), norm), xo, eps, norm, lo, hi)
        if k > 0:
            z1 = _project(xa + 0.75 * (z1 - xa) + 0.25 * (xa - x_prev[act]), xo, eps, norm, lo, hi)
        x_prev[act] = xa
        x_adv[act] = z1
        lv_a, gr_a, wrong = _grad(model, z1, y[act], loss, None if target is None else target[act])
        grad[act] = gr_a
        newly = act[wrong]
        best_adv[newly] = z1[wrong]
        broken[newly] = True
        better = lv_a > loss_best[act]
        incr[act[better]] += 1
        up = act[better]
        x_best[up], loss_best[up], grad_best[up] = z1[better], lv_a[better], gr_a[better]
        if k + 1 in checks:
            height = k + 1 - last_check
            reduce = (incr < 0.75 * height) | ((step_at_check == step) & (loss_at_check >= loss_best))
            reduce &= ~broken
            step_at_check, loss_at_check = step.clone(), loss_best.clone()
            step[reduce] /= 2.0
            x_adv[reduce] = x_best[reduce]
            grad[reduce] = grad_best[reduce]
            incr.zero_()
            last_check = k + 1
    return best_adv, broken
