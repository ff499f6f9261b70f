"""Knowledge distillation (Hinton et al.) into a smaller student of the same zoo family:
every width argument halved, so the student has at most half the teacher's parameters."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from hardening.errors import InputError
from hardening.harden.base import Context, Result, Timer, batches, logits, parameters
from hardening.zoo import ARCHITECTURES, WIDTH_KWARGS


def student_kwargs(arch: str, kwargs: dict) -> dict:
    """The teacher's constructor arguments with every width argument halved."""
    if arch not in WIDTH_KWARGS:
        raise InputError(f"distill: no smaller student is defined for architecture {arch!r}")
    defaults = {k: p.default for k, p in inspect.signature(ARCHITECTURES[arch]).parameters.items()}
    out = dict(kwargs)
    for k in WIDTH_KWARGS[arch]:
        out[k] = max(1, int(kwargs.get(k, defaults[k])) // 2)
    return out


def distill(ctx: Context) -> Result:
    """loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    b = ctx.budget("distill")
    T, alpha = b["temperature"], b["alpha"]
    kw = student_kwargs(ctx.arch, ctx.kwargs)
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    student = ARCHITECTURES[ctx.arch](**kw).train()
    teacher_params, student_params = parameters(ctx.teacher), parameters(student)
    if 2 * student_params > teacher_params:
        raise InputError(f"distill: the student has {student_params} parameters, more than half the "
                         f"teacher's {teacher_params}")
    x, y = ctx.x_train, ctx.y_train
    with torch.no_grad():
        soft = torch.softmax(logits(ctx.teacher, x) / T, 1)
    opt = torch.optim.Adam(student.parameters(), lr=b["lr"])
    kl = nn.KLDivLoss(reduction="batchmean")
    with Timer() as t:
        for _ in range(b["epochs"]):
            for idx in batches(len(x), b["batch"], g):
                opt.zero_grad()
                out = logits(student, x[idx])
                loss = alpha * T * T * kl(torch.log_softmax(out / T, 1), soft[idx]) + \
                    (1 - alpha) * nn.functional.cross_entropy(out, y[idx])
                loss.backward()
                opt.step()
    recipe = {
        "tool": "torch knowledge distillation (plain loop)",
        "method": "Hinton et al. 2015: soft teacher targets at temperature T plus hard-label cross-entropy",
        "student_arch": ctx.arch, "student_kwargs": kw, "student_parameters": student_params,
        "teacher_parameters": teacher_params, "parameter_ratio": student_params / teacher_params,
        "temperature": T, "soft_loss_weight": alpha, "hard_loss_weight": 1 - alpha,
        "epochs": b["epochs"], "batch": b["batch"], "optimizer": "Adam", "lr": b["lr"],
        "init": f"random (seed {ctx.seed})", "train_samples": int(len(x)), "seed": ctx.seed,
        "train_seconds": t.seconds,
    }
    return Result(student.eval(), ctx.arch, kw, recipe)
