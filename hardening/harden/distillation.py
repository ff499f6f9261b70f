"""Knowledge distillation (Hinton et al.) into a smaller student: for a zoo network the same
family with every width argument halved; for a reference network the student in
``REFERENCE_STUDENTS`` at the teacher's channels and classes (MobileNetV3-small at half
width; ResNet-18 into the zoo's ``image_cnn``). Refused unless the student has at most half
the teacher's parameters."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from hardening.errors import InputError
from hardening.harden.base import Context, Result, Timer, batches, logits, parameters, pgd
from hardening.reference_models import REFERENCE_ARCHITECTURES
from hardening.zoo import ARCHITECTURES, WIDTH_KWARGS

# Student of each reference network, as (architecture, width arguments): MobileNetV3-small at
# width 0.5 (0.27x the parameters, fewer MACs too); ResNet-18 into three strided conv blocks
# with global pooling (1% of its parameters, a zoo architecture, so a plain state dict).
REFERENCE_STUDENTS = {"mobilenet_v3_small": ("mobilenet_v3_small", {"width_mult": 0.5}),
                      "resnet18": ("image_cnn", {"width": 32, "feature_dim": 128})}


def student_of(arch: str, kwargs: dict) -> tuple[str, dict]:
    """The student's zoo architecture and constructor arguments."""
    if arch in REFERENCE_ARCHITECTURES:
        name, widths = REFERENCE_STUDENTS[arch]
        return name, {"in_channels": kwargs["in_channels"], "num_classes": kwargs["num_classes"], **widths}
    return arch, student_kwargs(arch, kwargs)


def student_kwargs(arch: str, kwargs: dict) -> dict:
    """The teacher's constructor arguments with every width argument halved."""
    if arch not in WIDTH_KWARGS:
        raise InputError(f"distill: no smaller student is defined for architecture {arch!r}")
    defaults = {k: p.default for k, p in inspect.signature(ARCHITECTURES[arch]).parameters.items()}
    out = dict(kwargs)
    for k in WIDTH_KWARGS[arch]:
        out[k] = max(1, int(kwargs.get(k, defaults[k])) // 2)
    return out


def _student(ctx: Context) -> tuple[nn.Module, str, dict, int, int]:
    arch, kw = student_of(ctx.arch, ctx.kwargs)
    torch.manual_seed(ctx.seed)
    student = (ARCHITECTURES.get(arch) or REFERENCE_ARCHITECTURES[arch])(**kw).train()
    teacher_params, student_params = parameters(ctx.teacher), parameters(student)
    if 2 * student_params > teacher_params:
        raise InputError(f"distill: the student has {student_params} parameters, more than half the "
                         f"teacher's {teacher_params}")
    return student, arch, kw, teacher_params, student_params


class _Distillation:
    """What both distillation recipes set up, in this order (seeded): the budget, the half-width
    student, the batch generator, the teacher's soft targets at T, Adam and the KL loss."""

    def __init__(self, ctx: Context, recipe: str) -> None:
        self.budget = b = ctx.budget(recipe)
        self.T, self.alpha = b["temperature"], b["alpha"]
        self.student, self.arch, self.kw, self.teacher_params, self.student_params = _student(ctx)
        self.g = torch.Generator().manual_seed(ctx.seed)
        self.x, self.y = ctx.x_train, ctx.y_train
        with torch.no_grad():
            self.soft = torch.softmax(logits(ctx.teacher, self.x) / self.T, 1)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=b["lr"])
        self.kl = nn.KLDivLoss(reduction="batchmean")


def adv_distill(ctx: Context) -> Result:
    """Adversarially robust distillation (ARD, Goldblum et al. 2020) into the half-width student:
    loss = alpha * T^2 * KL(t(x)/T || s(x_adv)/T) + (1 - alpha) * CE(s(x), y), where x_adv is PGD
    on the student maximising that KL. The teacher is the given source (pass an ``adv_pgd.pt``
    as ``--torch-source`` for a robust teacher)."""
    d = _Distillation(ctx, "adv_distill")
    b, T, alpha, student, kw, x, y = d.budget, d.T, d.alpha, d.student, d.kw, d.x, d.y
    teacher_params, student_params, g, soft, opt, kl = d.teacher_params, d.student_params, d.g, d.soft, d.opt, d.kl
    train_eps = ctx.eps * b["train_eps_factor"]
    with Timer() as t:
        for _ in range(b["epochs"]):
            for idx in batches(len(x), b["batch"], g):
                target = soft[idx]
                adv = pgd(student, x[idx], y[idx], train_eps, b["steps"], ctx.clip, g,
                          loss_fn=lambda out, p=target: kl(torch.log_softmax(out / T, 1), p))
                opt.zero_grad()
                loss = alpha * T * T * kl(torch.log_softmax(logits(student, adv) / T, 1), target) + \
                    (1 - alpha) * nn.functional.cross_entropy(logits(student, x[idx]), y[idx])
                loss.backward()
                opt.step()
    recipe = {
        "tool": "torch adversarially robust distillation (plain loop)",
        "method": "ARD (Goldblum et al. 2020): KL(teacher(x) || student(PGD(x))) at temperature T + hard-label CE",
        "teacher": "the --torch-source model", "student_arch": d.arch, "student_kwargs": kw,
        "student_parameters": student_params, "teacher_parameters": teacher_params,
        "parameter_ratio": student_params / teacher_params, "temperature": T, "soft_loss_weight": alpha,
        "hard_loss_weight": 1 - alpha, "norm": "inf", "eps": ctx.eps, "train_eps": train_eps,
        "pgd_steps": b["steps"], "pgd_step_size": 2.5 * train_eps / b["steps"], "random_start": True,
        "pgd_objective": "KL(teacher soft targets || student at T)", "epochs": b["epochs"], "batch": b["batch"],
        "optimizer": "Adam", "lr": b["lr"], "init": f"random (seed {ctx.seed})", "train_samples": int(len(x)),
        "seed": ctx.seed, "train_seconds": t.seconds,
    }
    return Result(student.eval(), d.arch, kw, recipe)


def distill(ctx: Context) -> Result:
    """loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)."""
    d = _Distillation(ctx, "distill")
    b, T, alpha, student, kw, x, y = d.budget, d.T, d.alpha, d.student, d.kw, d.x, d.y
    teacher_params, student_params, g, soft, opt, kl = d.teacher_params, d.student_params, d.g, d.soft, d.opt, d.kl
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
        "student_arch": d.arch, "student_kwargs": kw, "student_parameters": student_params,
        "teacher_parameters": teacher_params, "parameter_ratio": student_params / teacher_params,
        "temperature": T, "soft_loss_weight": alpha, "hard_loss_weight": 1 - alpha,
        "epochs": b["epochs"], "batch": b["batch"], "optimizer": "Adam", "lr": b["lr"],
        "init": f"random (seed {ctx.seed})", "train_samples": int(len(x)), "seed": ctx.seed,
        "train_seconds": t.seconds,
    }
    return Result(student.eval(), d.arch, kw, recipe)
