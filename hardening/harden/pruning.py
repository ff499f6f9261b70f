"""Pruning then fine-tuning, the one implementation behind ``edgeward harden``'s
``prune_structured`` recipe and ``edgeward compress``'s pruned variants.

Structured: torch-pruning's dependency graph physically removes the lowest-L2 output
channels of every layer but the classifier head (the last Linear) and the inputs of the
layers that consume them. With one ratio for every layer a pruned zoo network is the same
architecture at smaller widths, so it is saved as a plain state dict; a pruned reference
network (MobileNetV3, ResNet: depthwise groups, residual adds and squeeze-excitation scales
are pruned together by the dependency graph) keeps the pruned module itself, written as
TorchScript.

Unstructured: ``torch.nn.utils.prune`` global L1 over every Conv2d/Linear weight; the masks
stay attached while fine-tuning (pruned weights get no update) and are folded in after.
The graph stays dense: same file size and latency, zeros only.

Both fine-tune through ``base.train_loop`` (a time cap, when the budget has one, cuts the
epochs) and record the held-out accuracy right after pruning.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hardening.errors import InputError
from hardening.harden.base import Context, Result, logits, parameters, torch_accuracy, train_loop
from hardening.reference_models import REFERENCE_ARCHITECTURES
from hardening.zoo import ARCHITECTURES, LogitsOnly


def _widths(arch: str, model: nn.Module, kwargs: dict) -> dict:
    """Constructor arguments that rebuild the pruned network's shapes."""
    if arch == "digits_cnn":
        return {**kwargs, "width": model.conv1.out_channels, "feature_dim": model.fc.out_features}
    if arch == "tabular_mlp":
        return {**kwargs, "hidden": model.fc1.out_features, "feature_dim": model.fc2.out_features}
    raise InputError(f"prune_structured: no width mapping for architecture {arch!r}")


def _heldout_accuracy(ctx: Context, model: nn.Module) -> float | None:
    """Accuracy on the calibration split (never trained on here), when the data has one."""
    if ctx.ds.x_cal is None or ctx.ds.y_cal is None:
        return None
    return torch_accuracy(model, ctx.ds.x_cal, ctx.ds.y_cal)


def _fine_tune(ctx: Context, model: nn.Module, b: dict, g: torch.Generator) -> dict:
    """Cross-entropy fine-tuning of the pruned ``model`` (Adam); the facts for the recipe,
    with the held-out accuracy right after pruning (what fine-tuning had to recover from;
    the caller measures the exported graph after)."""
    before = _heldout_accuracy(ctx, model)
    opt = torch.optim.Adam(model.parameters(), lr=b["lr"])
    facts = train_loop(model, opt, ctx.x_train, ctx.y_train, b, g,
                       lambda m, xb, yb: nn.functional.cross_entropy(logits(m, xb), yb))
    return {
        "fine_tune_epochs": facts.epochs_completed, "fine_tune": facts.to_dict(), "batch": b["batch"],
        "optimizer": "Adam", "lr": b["lr"], "train_samples": int(len(ctx.x_train)), "seed": ctx.seed,
        "train_seconds": facts.seconds, "heldout_accuracy_pruned": before,
        "heldout_split": "x_cal" if before is not None else None,
    }


def prune_structured(ctx: Context) -> Result:
    import torch_pruning as tp

    b = ctx.budget("prune_structured")
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher).eval()
    before = parameters(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_name, head = linears[-1] if linears else (None, None)
    # channel counts rounded to a multiple (``round_to``) keep onnxruntime's blocked conv kernels:
    # MobileNetV3 at ratio 0.3, p50 0.73x float rounded to 8 vs 1.39x unrounded; only for the
    # reference networks, whose pruned module ships as is (a zoo network is rebuilt from widths)
    round_to = b.get("round_to") if ctx.arch in REFERENCE_ARCHITECTURES else None
    pruner = tp.pruner.BasePruner(
        LogitsOnly(model), ctx.x_train[:2], importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=b["ratio"], ignored_layers=[head] if head is not None else [], global_pruning=False,
        round_to=round_to,
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
    tuned = _fine_tune(ctx, rebuilt, b, g)
    recipe = {
        "tool": f"torch_pruning {getattr(tp, '__version__', '?')} BasePruner + GroupMagnitudeImportance(p=2)",
        "method": "dependency-graph channel removal, same ratio per layer, classifier head kept; then fine-tuning",
        "what": f"channels removed: {after / before:.2f}x the parameters, a smaller dense network",
        "physically_smaller": True,
        "pruning_ratio": b["ratio"], "round_to": round_to, "global_pruning": False, "ignored_layers": [head_name] if head is not None else [],
        "pruned_kwargs": kw, "parameters_before": before, "parameters_after": after, **tuned,
    }
    return Result(rebuilt.eval(), ctx.arch, kw, recipe)


def prune_unstructured(ctx: Context) -> Result:
    from torch.nn.utils import prune

    b = ctx.budget("prune_unstructured")
    torch.manual_seed(ctx.seed)
    g = torch.Generator().manual_seed(ctx.seed)
    model = copy.deepcopy(ctx.teacher).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise InputError("prune_unstructured: the source has no Conv2d/Linear layers")
    prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=b["ratio"])
    tuned = _fine_tune(ctx, model, b, g)  # masks attached: pruned weights stay zero
    for m in layers:
        prune.remove(m, "weight")
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    recipe = {
        "tool": "torch.nn.utils.prune.global_unstructured(L1Unstructured)",
        "method": "global L1 magnitude pruning of every Conv2d/Linear weight, masks kept while fine-tuning",
        "what": f"{zeros / total:.0%} of the weights zero in a dense graph: same file size and latency as float",
        "physically_smaller": False,
        "pruning_ratio": b["ratio"], "achieved_weight_sparsity": zeros / total, "layers": len(layers),
        "parameters_before": parameters(ctx.teacher), "parameters_after": parameters(model), **tuned,
    }
    return Result(model.eval(), ctx.arch, dict(ctx.kwargs), recipe)
