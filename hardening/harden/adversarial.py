"""Adversarial fine-tuning from the float source's weights: PGD adversarial training
(Madry et al., mixed with the clean loss) and TRADES (Zhang et al.). Plain torch loops."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hardening.harden.base import Context, Result, logits, pgd, train_loop


def _fine_tune(ctx: Context, b: dict, batch_loss) -> tuple[nn.Module, float, float]:
    """Adam from the float source's weights through the shared loop (``base.train_loop``);
    ``batch_loss(model, xb, yb, train_eps, g)`` crafts the adversarial points and returns the
    loss. Returns (model in eval mode, training eps, seconds)."""
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher).train()
    opt = torch.optim.Adam(model.parameters(), lr=b["lr"])
    train_eps = ctx.eps * b.get("train_eps_factor", 1.0)
    facts = train_loop(model, opt, ctx.x_train, ctx.y_train, b, g,
                       lambda m, xb, yb: batch_loss(m, xb, yb, train_eps, g))
    return model, train_eps, facts.seconds


def _recipe(ctx: Context, b: dict, train_eps: float, seconds: float, **specific) -> dict:
    return {
        **specific,
        "norm": "inf", "eps": ctx.eps, "train_eps": train_eps, "pgd_steps": b["steps"],
        "pgd_step_size": 2.5 * train_eps / b["steps"], "random_start": True,
        "epochs": b["epochs"], "batch": b["batch"], "optimizer": "Adam", "lr": b["lr"],
        "lr_schedule": b.get("lr_schedule", "constant"),
        "init": "float source weights", "train_samples": int(len(ctx.x_train)), "seed": ctx.seed,
        "train_seconds": seconds,
    }


def adv_pgd(ctx: Context) -> Result:
    """loss = w * CE(clean) + (1 - w) * CE(PGD_eps(x)), L-inf, random start."""
    b = ctx.budget("adv_pgd")
    w = b["clean_weight"]

    def batch_loss(model, xb, yb, train_eps, g):
        adv = pgd(model, xb, yb, train_eps, b["steps"], ctx.clip, g)
        return w * nn.functional.cross_entropy(logits(model, xb), yb) + \
            (1 - w) * nn.functional.cross_entropy(logits(model, adv), yb)

    model, train_eps, seconds = _fine_tune(ctx, b, batch_loss)
    recipe = _recipe(ctx, b, train_eps, seconds,
                     tool="torch PGD adversarial fine-tuning (plain loop)",
                     method="PGD adversarial training (Madry et al. 2018), clean + adversarial cross-entropy",
                     clean_loss_weight=w, adversarial_loss_weight=1 - w)
    return Result(model, ctx.arch, dict(ctx.kwargs), recipe)


def trades(ctx: Context) -> Result:
    """loss = CE(clean) + beta * KL(p(x_adv) || p(x)), x_adv maximising that KL by PGD."""
    b = ctx.budget("trades")
    kl = nn.KLDivLoss(reduction="batchmean")

    def batch_loss(model, xb, yb, train_eps, g):
        with torch.no_grad():
            p_clean = torch.softmax(logits(model, xb), 1)
        adv = pgd(model, xb, yb, train_eps, b["steps"], ctx.clip, g,
                  loss_fn=lambda out, p=p_clean: kl(torch.log_softmax(out, 1), p))
        out_clean = logits(model, xb)
        return nn.functional.cross_entropy(out_clean, yb) + b["beta"] * kl(
            torch.log_softmax(logits(model, adv), 1), torch.softmax(out_clean, 1))

    model, train_eps, seconds = _fine_tune(ctx, b, batch_loss)
    recipe = _recipe(ctx, b, train_eps, seconds,
                     tool="torch TRADES fine-tuning (plain loop)",
                     method="TRADES (Zhang et al. 2019): CE(clean) + beta * KL(adv || clean)",
                     beta=b["beta"])
    return Result(model, ctx.arch, dict(ctx.kwargs), recipe)
