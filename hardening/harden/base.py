"""What every recipe shares: the float source it starts from, the data, seeded loops, and
how a result is written (ONNX + state dict + sidecar) so the audits read it unchanged."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hardening.data import Dataset
from hardening.errors import DataError

# Budgets per profile; every recipe records the numbers it used.
PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        "adv_pgd": {"epochs": 60, "steps": 7, "lr": 3e-3, "lr_schedule": "cosine", "clean_weight": 0.3,
                    "train_eps_factor": 2.0, "batch": 32},
        "trades": {"epochs": 30, "steps": 7, "lr": 3e-3, "beta": 6.0, "train_eps_factor": 1.5, "batch": 32},
        "distill": {"epochs": 40, "lr": 3e-3, "temperature": 4.0, "alpha": 0.7, "batch": 32},
        "prune_structured": {"ratio": 0.5, "epochs": 8, "lr": 1e-3, "batch": 32},
        "prune_unstructured": {"ratio": 0.5, "epochs": 2, "lr": 1e-3, "batch": 32},
        "adv_distill": {"epochs": 40, "steps": 5, "lr": 3e-3, "temperature": 4.0, "alpha": 0.7,
                        "train_eps_factor": 2.0, "batch": 32},
        "qat": {"epochs": 10, "lr": 5e-4, "batch": 32, "freeze_observers_after": 7},
        "mixed": {"tolerance": 0.01},
    },
    "thorough": {
        "adv_pgd": {"epochs": 120, "steps": 10, "lr": 3e-3, "lr_schedule": "cosine", "clean_weight": 0.3,
                    "train_eps_factor": 2.0, "batch": 32},
        "trades": {"epochs": 80, "steps": 10, "lr": 3e-3, "beta": 6.0, "train_eps_factor": 1.5, "batch": 32},
        "distill": {"epochs": 120, "lr": 3e-3, "temperature": 4.0, "alpha": 0.7, "batch": 32},
        "prune_structured": {"ratio": 0.5, "epochs": 30, "lr": 1e-3, "batch": 32},
        "prune_unstructured": {"ratio": 0.5, "epochs": 8, "lr": 1e-3, "batch": 32},
        "adv_distill": {"epochs": 120, "steps": 10, "lr": 3e-3, "temperature": 4.0, "alpha": 0.7,
                        "train_eps_factor": 2.0, "batch": 32},
        "qat": {"epochs": 30, "lr": 5e-4, "batch": 32, "freeze_observers_after": 20},
        "mixed": {"tolerance": 0.01},
    },
    # MobileNet/ResNet-class networks on a CPU (minutes per recipe at 3x96x96 on one thread):
    # fewer epochs and PGD steps, a gentler learning rate for fine-tuning a deeper network.
    "large": {
        "adv_pgd": {"epochs": 4, "steps": 3, "lr": 1e-3, "lr_schedule": "cosine", "clean_weight": 0.3,
                    "train_eps_factor": 1.5, "batch": 32},
        "trades": {"epochs": 3, "steps": 3, "lr": 1e-3, "lr_schedule": "cosine", "beta": 6.0,
                   "train_eps_factor": 1.5, "batch": 32},
        "distill": {"epochs": 10, "lr": 2e-3, "temperature": 4.0, "alpha": 0.7, "batch": 32},
        "prune_structured": {"ratio": 0.5, "epochs": 4, "lr": 1e-3, "batch": 32},
        "prune_unstructured": {"ratio": 0.5, "epochs": 2, "lr": 1e-3, "batch": 32},
        "adv_distill": {"epochs": 5, "steps": 3, "lr": 2e-3, "temperature": 4.0, "alpha": 0.7,
                        "train_eps_factor": 1.5, "batch": 32},
        "qat": {"epochs": 2, "lr": 2e-4, "batch": 32, "freeze_observers_after": 1},
        "mixed": {"tolerance": 0.01},
    },
}


@dataclass
class Context:
    """The float model a recipe starts from and the data it may train on (never ``x``/``y``:
    those are the evaluation split the audits judge on)."""

    teacher: nn.Module  # the float source, eval mode; recipes copy it, never modify it
    arch: str
    kwargs: dict
    ds: Dataset
    clip: tuple[float, float]
    eps: float  # L-inf budget in input units, for the adversarial recipes
    seed: int
    profile: str
    out: Path
    quant_bits: str = "w4a8"  # weight/activation bits of ptq, qat and mixed
    log: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)  # per recipe, on top of the profile (compress's caps)

    @property
    def x_train(self) -> torch.Tensor:
        return torch.from_numpy(self.ds.x_train)

    @property
    def y_train(self) -> torch.Tensor:
        return torch.from_numpy(self.ds.y_train)

    def budget(self, recipe: str) -> dict:
        return {**PROFILES[self.profile][recipe], **self.overrides.get(recipe, {})}


@dataclass
class Result:
    """What a recipe hands back: the trained module, its zoo architecture and the recipe."""

    model: nn.Module
    arch: str
    kwargs: dict
    recipe: dict
    deployed: nn.Module | None = None  # a graph the recipe's post step exports instead (PT2E's converted QDQ)


def check_training_data(ds: Dataset) -> None:
    if ds.x_train is None or ds.y_train is None:
        raise DataError(f"{ds.source}: harden needs a training split ('x_train', 'y_train') to fine-tune on")


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def batches(n: int, size: int, g: torch.Generator):
    return torch.randperm(n, generator=g).split(size)


def parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 128) -> float:
    model.eval()
    pred = torch.cat([logits(model, b).argmax(1) for b in torch.from_numpy(x).split(batch)])
    return float((pred.numpy() == y).mean())


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, clip: tuple[float, float],
        g: torch.Generator, loss_fn=None) -> torch.Tensor:
    """L-inf PGD with a uniform random start (Madry et al.), step 2.5 * eps / steps, clipped to the data range.
    ``loss_fn(logits_adv)`` defaults to cross-entropy against ``y``."""
    alpha = 2.5 * eps / steps
    was_training = model.training
    model.eval()
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    adv = (x + delta).clamp(*clip).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        out = logits(model, adv)
        loss = loss_fn(out) if loss_fn is not None else nn.functional.cross_entropy(out, y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(*clip).detach()
    model.train(was_training)
    return adv


PROBE_STEPS = 3  # training steps timed before a time-capped loop plans its epochs


@dataclass
class TrainFacts:
    """What a training loop actually did, for the recipe (a time cap may stop it early)."""

    epochs_budget: int
    epochs_planned: int
    epochs_completed: int
    min_epochs: int
    steps: int
    seconds: float
    max_seconds: float | None
    stopped_by: str  # "epochs" | "time budget"
    lr_schedule: str

    def to_dict(self) -> dict:
        return asdict(self)


def train_loop(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, b: dict,
               g: torch.Generator, batch_loss) -> TrainFacts:
    """The one fine-tuning loop: ``b["epochs"]`` seeded passes of ``batch_loss(model, xb, yb)``
    (which may craft adversarial points first, so gradients are zeroed after it), optional
    per-epoch cosine decay (``lr_schedule``). With ``max_seconds`` the first steps are timed
    and the epochs cut to what fits (never below ``min_epochs``, default 1), the cosine decay
    spread over those; past ``min_epochs``, a cap overrun by half stops the loop."""
    epochs, cap = int(b["epochs"]), b.get("max_seconds")
    floor = min(epochs, int(b.get("min_epochs", 1)))  # what a cap never cuts below
    schedule = b.get("lr_schedule", "constant")
    sched = _cosine(opt, epochs) if schedule == "cosine" and cap is None else None
    planned, steps, done, stopped = epochs, 0, 0, "epochs"
    per_epoch = -(-len(x) // int(b["batch"]))
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        if done >= planned or (cap is not None and done >= floor and time.perf_counter() - t0 > 1.5 * cap):
            stopped = "time budget"
            break
        for idx in batches(len(x), b["batch"], g):
            loss = batch_loss(model, x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if cap is not None and done == 0 and steps == min(PROBE_STEPS, per_epoch):
                epoch_s = (time.perf_counter() - t0) / steps * per_epoch
                planned = max(floor, min(epochs, int(cap // max(epoch_s, 1e-9))))
                sched = _cosine(opt, planned) if schedule == "cosine" else None
        done += 1
        if sched is not None:
            sched.step()
    model.eval()
    return TrainFacts(epochs, planned, done, floor, steps, round(time.perf_counter() - t0, 3), cap, stopped, schedule)


def _cosine(opt: torch.optim.Optimizer, epochs: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = round(time.perf_counter() - self.t0, 3)
