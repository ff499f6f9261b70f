"""Structured pruning that physically removes channels: torch-pruning's dependency graph
drops the lowest-L2 output channels of every layer but the classifier head (the last
Linear) and the inputs of the layers that consume them, then a brief fine-tune. With one
ratio for every layer a pruned zoo network is the same architecture at smaller widths, so
it is saved as a plain state dict; a pruned reference network (MobileNetV3, ResNet: depthwise
groups, residual adds and squeeze-excitation scales are pruned together by the dependency
graph) keeps the pruned module itself, written as TorchScript."""

from __future__ import annotations

import copy

import torch
from torch import nn

from hardening.errors import InputError
from hardening.harden.base import Context, Result, Timer, batches, logits, parameters
from hardening.reference_models import REFERENCE_ARCHITECTURES
from hardening.zoo import ARCHITECTURES, LogitsOnly


def _widths(arch: str, model: nn.Module, kwargs: dict) -> dict:
    """Constructor arguments that rebuild the pruned network's shapes."""
    if arch == "digits_cnn":
        return {**kwargs, "width": model.conv1.out_channels, "feature_dim": model.fc.out_features}
    if arch == "tabular_mlp":
        return {**kwargs, "hidden": model.fc1.out_features, "feature_dim": model.fc2.out_features}
    raise InputError(f"prune_structured: no width mapping for architecture {arch!r}")


def prune_structured(ctx: Context) -> Result:
    import torch_pruning as tp

    b = ctx.budget("prune_structured")
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher).eval()
    before = parameters(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_name, head = linears[-1] if linears else (None, None)
    pruner = tp.pruner.BasePruner(
        LogitsOnly(model), ctx.x_train[:2], importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=b["ratio"], ignored_layers=[head] if head is not None else [], global_pruning=False,
    )
    pruner.step()
    if ctx.arch in REFERENCE_ARCHITECTURES:  # irregular widths: the pruned module is the result
        kw, rebuilt = dict(ctx.kwargs), model
    else:
        kw = _widths(ctx.arch, model, ctx.kwargs)
        rebuilt = ARCHITECTURES[ctx.arch](**kw)
        try:
            rebuilt.load_state_dict(model.state_dict())
        except RuntimeError as e:
            raise InputError(f"prune_structured: pruned shapes do not fit {ctx.arch}({kw}): "
                             f"{str(e).splitlines()[0][:160]}") from None
    after = parameters(rebuilt)
    x, y = ctx.x_train, ctx.y_train
    opt = torch.optim.Adam(rebuilt.parameters(), lr=b["lr"])
    rebuilt.train()
    with Timer() as t:
        for _ in range(b["epochs"]):
            for idx in batches(len(x), b["batch"], g):
                opt.zero_grad()
                nn.functional.cross_entropy(logits(rebuilt, x[idx]), y[idx]).backward()
                opt.step()
    recipe = {
        "tool": f"torch_pruning {getattr(tp, '__version__', '?')} BasePruner + GroupMagnitudeImportance(p=2)",
        "method": "dependency-graph channel removal, same ratio per layer, classifier head kept; then fine-tuning",
        "pruning_ratio": b["ratio"], "global_pruning": False, "ignored_layers": [head_name] if head is not None else [],
        "pruned_kwargs": kw, "parameters_before": before, "parameters_after": after,
        "fine_tune_epochs": b["epochs"], "batch": b["batch"], "optimizer": "Adam", "lr": b["lr"],
        "train_samples": int(len(x)), "seed": ctx.seed, "train_seconds": t.seconds,
    }
    return Result(rebuilt.eval(), ctx.arch, kw, recipe)
