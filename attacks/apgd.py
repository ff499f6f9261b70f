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

# Adaptive runs (the quick profile): iterations at most ADAPTIVE_CEILING x n_iter, and only
# for points still closing in on the boundary. Progress comes in bursts (each step-size
# halving can start one), so the extrapolation gets ADAPTIVE_SLACK before a point stops. A
# survivor whose margin fell below ADAPTIVE_CLOSE of its start gets ADAPTIVE_RESTARTS more
# random starts (such points are where one run's luck decides; measured in BENCHMARKS.md).
ADAPTIVE_CEILING = 1.5
ADAPTIVE_SLACK = 2.0
ADAPTIVE_CLOSE = 0.25
ADAPTIVE_RESTARTS = 1


def _checkpoints(n_iter: int, ceiling: int | None = None) -> list[int]:
    """Iterations after which step sizes are checked: the reference's integer schedule
    (first after 22% of ``n_iter``, segments shrinking by 3% to a floor of 6%), continued at
    the floor up to ``ceiling`` (adaptive runs only)."""
    first, floor, shrink = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    out, k, seg = [], 0, first
    while k + seg <= max(n_iter, ceiling or 0):
        k += seg
        out.append(k)
        seg = max(seg - shrink, floor) if k < n_iter else floor
    return out


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
         seed: int = 0, adaptive: bool = False, group: np.ndarray | None = None) -> np.ndarray:
    """Adversarial candidates for ``x`` (the input itself where no run misclassified it).

    ``loss``: "ce" or "dlr"; with ``target`` (one class per row) the targeted DLR loss.
    ``group``: rows with equal ids are one point attacked several ways (one row per target
    class): they run in one batch, and once one row of a group is misclassified the
    group's other rows stop (their candidates stay the clean input).
    ``adaptive``: the budget follows each point's progress. At each checkpoint a point whose
    logit margin is not falling fast enough to reach the decision boundary by
    ``ADAPTIVE_CEILING * n_iter`` iterations (linear extrapolation of its progress since
    the previous checkpoint, ``adaptive_stop``) stops there; one still closing in goes on
    past ``n_iter`` up to that ceiling. A point far inside its class costs one segment
    (22% of ``n_iter``), one near the boundary the whole schedule and more.
    """
    lo, hi = float(clip[0]), float(clip[1])
    g = torch.Generator().manual_seed(int(seed))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    tt = None if target is None else torch.from_numpy(np.asarray(target, dtype=np.int64))
    gt = torch.arange(len(x)) if group is None else torch.from_numpy(np.asarray(group, dtype=np.int64))
    out = xt.clone()
    open_ = torch.ones(len(x), dtype=torch.bool)
    ceiling = int(math.ceil(ADAPTIVE_CEILING * n_iter)) if adaptive else int(n_iter)
    checks = _checkpoints(n_iter, ceiling)
    runs = max(1, int(restarts))
    r = 0
    while r < runs:
        idx = torch.nonzero(open_).flatten()
        if not len(idx):
            break
        adv, found, closeness = _run(model, xt[idx], yt[idx], None if tt is None else tt[idx], gt[idx], eps, norm,
                                     ceiling, lo, hi, loss, checks, g, adaptive)
        out[idx[found]] = adv[found]
        open_ &= ~torch.isin(gt, gt[idx[found]])
        r += 1
        if adaptive and r == runs and runs < max(1, int(restarts)) + ADAPTIVE_RESTARTS:
            # survivors that got close to the boundary get another random start; the rest are done
            near = torch.zeros(len(x), dtype=torch.bool)
            near[idx[~found & (closeness < ADAPTIVE_CLOSE)]] = True
            if near.any():
                open_ &= near
                runs += 1
    return out.numpy()


def adaptive_stop(margin_now: torch.Tensor, margin_before: torch.Tensor, done: int, since: int,
                  n_iter: int) -> torch.Tensor:
    """Points to stop: margin (true logit minus the attacked one, > 0 while correct) not
    projected to reach 0 by ``n_iter`` at the rate it fell over the last ``since`` steps."""
    rate = (margin_before - margin_now).clamp_min(0) / max(1, since)
    return margin_now - ADAPTIVE_SLACK * rate * (n_iter - done) > 0


def _margin(z: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    zy = z.gather(1, y[:, None])[:, 0]
    if target is not None:
        return zy - z.gather(1, target[:, None])[:, 0]
    other = z.clone()
    other.scatter_(1, y[:, None], -float("inf"))
    return zy - other.max(1).values


def _grad(model, x, y, loss, target):
    x = x.clone().requires_grad_(True)
    z = model(x)
    if isinstance(z, (tuple, list)):
        z = z[0]
    lv = _loss(z, y, loss, target)
    (grad,) = torch.autograd.grad(lv.sum(), x)
    z = z.detach()
    # an expanded grad cannot be written into, hence contiguous()
    return lv.detach(), grad.detach().contiguous(), z.argmax(1) != y, _margin(z, y, target)


def _run(model, x, y, target, group, eps, norm, ceiling, lo, hi, loss, checks, g, adaptive):  # noqa: C901 - the algorithm
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
    stopped = torch.zeros(n, dtype=torch.bool)
    lv, grad, wrong, margin = _grad(model, x_adv, y, loss, target)
    margin_start = margin.clone()
    best_adv[wrong] = x_adv[wrong]
    broken |= wrong
    step = torch.full((n,), 2.0 * eps)
    x_best, loss_best, grad_best = x_adv.clone(), lv.clone(), grad.clone()
    x_prev = x_adv.clone()
    loss_prev = lv.clone()
    margin_best = margin.clone()
    margin_at_check = margin.clone()
    incr = torch.zeros(n)
    loss_at_check = loss_best.clone()
    reduced_at_check = torch.ones(n, dtype=torch.bool)
    last_check = 0
    for k in range(ceiling):
        act = torch.nonzero(~broken & ~stopped).flatten()  # early stop: only points still correct and progressing
        if not len(act):
            break
        xa, xo, gr = x_adv[act], x[act], grad[act]
        z1 = _project(xa + _step(gr, step[act].view(shape), norm), xo, eps, norm, lo, hi)
        if k > 0:
            z1 = _project(xa + 0.75 * (z1 - xa) + 0.25 * (xa - x_prev[act]), xo, eps, norm, lo, hi)
        x_prev[act] = xa
        x_adv[act] = z1
        lv_a, gr_a, wrong, m_a = _grad(model, z1, y[act], loss, None if target is None else target[act])
        grad[act] = gr_a
        newly = act[wrong]
        best_adv[newly] = z1[wrong]
        broken[newly] = True
        if len(newly):
            stopped |= torch.isin(group, group[newly])  # the point is broken: its other rows are done
        incr[act] += (lv_a > loss_prev[act]).float()  # the reference counts steps that raised the loss
        loss_prev[act] = lv_a
        margin_best[act] = torch.minimum(margin_best[act], m_a)
        better = lv_a > loss_best[act]
        up = act[better]
        x_best[up], loss_best[up], grad_best[up] = z1[better], lv_a[better], gr_a[better]
        if k + 1 in checks:
            height = k + 1 - last_check
            reduce = (incr <= 0.75 * height) | (~reduced_at_check & (loss_at_check >= loss_best))
            reduce &= ~broken
            reduced_at_check, loss_at_check = reduce.clone(), loss_best.clone()
            step[reduce] /= 2.0
            x_adv[reduce] = x_best[reduce]
            grad[reduce] = grad_best[reduce]
            incr.zero_()
            if adaptive and k + 1 < ceiling:
                stopped |= adaptive_stop(margin_best, margin_at_check, k + 1, height, ceiling) & ~broken
            margin_at_check = margin_best.clone()
            last_check = k + 1
    return best_adv, broken, margin_best / margin_start.clamp_min(1e-12)
