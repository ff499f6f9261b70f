"""Adversarial fine-tuning from the float source's weights: PGD adversarial training
(Madry et al., mixed with the clean loss) and TRADES (Zhang et al.). Plain torch loops."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hardening.harden.base import Context, Result, Timer, batches, logits, pgd


def _schedule(opt, b: dict):
    """Per-epoch cosine decay to zero when the budget asks for it."""
    if b.get("lr_schedule", "constant") != "cosine":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=b["epochs"])


def adv_pgd(ctx: Context) -> Result:
    """loss = w * CE(clean) + (1 - w) * CE(PGD_eps(x)), L-inf, random start."""
    b = ctx.budget("adv_pgd")
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher).train()
    opt = torch.optim.Adam(model.parameters(), lr=b["lr"])
    x, y = ctx.x_train, ctx.y_train
    w = b["clean_weight"]
    train_eps = ctx.eps * b.get("train_eps_factor", 1.0)
    sched = _schedule(opt, b)
    with Timer() as t:
        for _ in range(b["epochs"]):
            for idx in batches(len(x), b["batch"], g):
                xb, yb = x[idx], y[idx]
                adv = pgd(model, xb, yb, train_eps, b["steps"], ctx.clip, g)
                opt.zero_grad()
                loss = w * nn.functional.cross_entropy(logits(model, xb), yb) + \
                    (1 - w) * nn.functional.cross_entropy(logits(model, adv), yb)
                loss.backward()
                opt.step()
            if sched is not None:
                sched.step()
    recipe = {
        "tool": "torch PGD adversarial fine-tuning (plain loop)",
        "method": "PGD adversarial training (Madry et al. 2018), clean + adversarial cross-entropy",
        "norm": "inf", "eps": ctx.eps, "train_eps": train_eps, "pgd_steps": b["steps"],
        "pgd_step_size": 2.5 * train_eps / b["steps"], "random_start": True, "clean_loss_weight": w, "adversarial_loss_weight": 1 - w,
        "epochs": b["epochs"], "batch": b["batch"], "optimizer": "Adam", "lr": b["lr"],
        "lr_schedule": b.get("lr_schedule", "constant"),
        "init": "float source weights", "train_samples": int(len(x)), "seed": ctx.seed,
        "train_seconds": t.seconds,
    }
    return Result(model.eval(), ctx.arch, dict(ctx.kwargs), recipe)


def trades(ctx: Context) -> Result:
    """loss = CE(clean) + beta * KL(p(x_adv) || p(x)), x_adv maximising that KL by PGD."""
    b = ctx.budget("trades")
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher).train()
    opt = torch.optim.Adam(model.parameters(), lr=b["lr"])
    x, y = ctx.x_train, ctx.y_train
    kl = nn.KLDivLoss(reduction="batchmean")
    train_eps = ctx.eps * b.get("train_eps_factor", 1.0)
    sched = _schedule(opt, b)
    with Timer() as t:
        for _ in range(b["epochs"]):
            for idx in batches(len(x), b["batch"], g):
                xb, yb = x[idx], y[idx]
                with torch.no_grad():
                    p_clean = torch.softmax(logits(model, xb), 1)
                adv = pgd(model, xb, yb, train_eps, b["steps"], ctx.clip, g,
                          loss_fn=lambda out, p=p_clean: kl(torch.log_softmax(out, 1), p))
                opt.zero_grad()
                out_clean = logits(model, xb)
                loss = nn.functional.cross_entropy(out_clean, yb) + b["beta"] * kl(
                    torch.log_softmax(logits(model, adv), 1), torch.softmax(out_clean, 1))
                loss.backward()
                opt.step()
            if sched is not None:
                sched.step()
    recipe = {
        "tool": "torch TRADES fine-tuning (plain loop)",
        "method": "TRADES (Zhang et al. 2019): CE(clean) + beta * KL(adv || clean)",
        "norm": "inf", "eps": ctx.eps, "train_eps": train_eps, "pgd_steps": b["steps"],
        "pgd_step_size": 2.5 * train_eps / b["steps"], "random_start": True, "beta": b["beta"], "epochs": b["epochs"], "batch": b["batch"],
        "optimizer": "Adam", "lr": b["lr"], "lr_schedule": b.get("lr_schedule", "constant"),
        "init": "float source weights", "train_samples": int(len(x)),
        "seed": ctx.seed, "train_seconds": t.seconds,
    }
    return Result(model.eval(), ctx.arch, dict(ctx.kwargs), recipe)
