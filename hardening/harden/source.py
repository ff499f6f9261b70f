"""The PyTorch source ``harden`` retrains, whatever form the user brings it in.

Accepted: a state dict of a ``hardening/zoo.py`` architecture or of a reference
architecture (``hardening/reference_models.py``: ResNet-18, MobileNetV3-small, with
torchvision's layer names) with its ``.json`` sidecar; or a TorchScript file of a reference
architecture (what ``torch.jit.trace`` of such a model writes: its root module keeps the
class name and every parameter). A TorchScript file is rebuilt as the eager module it was
traced from, so every recipe (including channel pruning and fake quantization, which need
real ``nn.Conv2d`` layers) works on it; the weights are checked to fit exactly.

Zoo architectures stay state dicts on the way out. Everything else (a reference network,
or one whose channels were pruned to widths its constructor cannot rebuild) is written as
TorchScript, which ``hardening.torch_source.load_torch_source`` reads back as is.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hardening.errors import ModelError
from hardening.reference_models import REFERENCE_ARCHITECTURES
from hardening.torch_source import read_sidecar, save_state_dict
from hardening.zoo import ARCHITECTURES

WIDTH_MULTS = (1.0, 0.5, 0.75, 0.35, 0.25)
_REFERENCE_BY_CLASS = {cls.__name__: name for name, cls in REFERENCE_ARCHITECTURES.items()}


@dataclass
class Source:
    """An eager module ``harden`` can copy and train, and how to rebuild or save it."""

    module: nn.Module  # eval mode
    arch: str
    kwargs: dict
    torchscript: bool  # the user's file was TorchScript (copied to ``float.pt`` as is)

    @property
    def is_zoo(self) -> bool:
        return self.arch in ARCHITECTURES

    def sidecar(self) -> dict:
        return {"arch": self.arch, "kwargs": self.kwargs}


def is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def _reference_kwargs(state: dict[str, torch.Tensor]) -> dict:
    """``num_classes`` and ``in_channels`` of a reference network, read off its weights."""
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    linears = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not convs or not linears:
        raise ModelError("no convolution or linear weights")
    return {"num_classes": int(linears[-1].shape[0]), "in_channels": int(convs[0].shape[1])}


def _load_into(arch: str, kwargs: dict, state: dict, path: Path) -> nn.Module:
    cls = ARCHITECTURES.get(arch) or REFERENCE_ARCHITECTURES.get(arch)
    if cls is None:
        known = sorted({*ARCHITECTURES, *REFERENCE_ARCHITECTURES})
        raise ModelError(f"{path}: unknown architecture {arch!r}; harden retrains {', '.join(known)}")
    try:
        model = cls(**kwargs)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, KeyError) as e:
        raise ModelError(f"{path}: weights do not fit {arch}({kwargs}): {str(e).splitlines()[0][:200]}") from None
    return model.eval()


def _from_torchscript(path: Path) -> Source:
    try:
        ts = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        raise ModelError(f"{path}: TorchScript load failed: {str(e).splitlines()[0]}") from None
    name = getattr(ts, "original_name", "")
    arch = _REFERENCE_BY_CLASS.get(name)
    if arch is None:
        known = ", ".join(f"{c} ({a})" for c, a in _REFERENCE_BY_CLASS.items())
        raise ModelError(f"{path}: a TorchScript {name or 'module'} cannot be retrained: harden rebuilds TorchScript "
                         f"of {known} only; pass a state dict of a hardening/zoo.py architecture with its .json "
                         "sidecar, or use edgeward compress for post-training variants")
    state = {k: v.detach().clone() for k, v in ts.state_dict().items()}
    module, kwargs = _fit_reference(arch, state, path)
    return Source(module, arch, kwargs, torchscript=True)


def _fit_reference(arch: str, state: dict, path: Path) -> tuple[nn.Module, dict]:
    """Rebuild a reference network from its weights alone: classes and input channels from the
    first convolution and the last linear layer, MobileNet's ``width_mult`` by trying
    torchvision's usual multipliers until the shapes fit exactly."""
    try:
        kwargs = _reference_kwargs(state)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    widths = WIDTH_MULTS if arch == "mobilenet_v3_small" else (None,)
    for wm in widths[:-1]:
        try:
            kw = {**kwargs, "width_mult": wm}
            return _load_into(arch, kw, state, path), kw
        except ModelError:
            continue
    kw = kwargs if widths[-1] is None else {**kwargs, "width_mult": widths[-1]}
    return _load_into(arch, kw, state, path), kw


def load_source(path: str | Path) -> Source:
    """The eager module behind ``path`` (TorchScript or state dict + ``.json`` sidecar)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: PyTorch source not found")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a PyTorch file (expected a TorchScript or state-dict zip)")
    if is_torchscript(path):
        return _from_torchscript(path)
    spec = read_sidecar(path)
    arch, kwargs = spec.get("arch"), dict(spec.get("kwargs", {}))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: state dict load failed: {str(e).splitlines()[0][:200]}") from None
    if arch in REFERENCE_ARCHITECTURES and not kwargs:
        module, kwargs = _fit_reference(arch, state, path)
        return Source(module, arch, kwargs, torchscript=False)
    return Source(_load_into(str(arch), kwargs, state, path), str(arch), kwargs, torchscript=False)


def save_source(model: nn.Module, path: Path, arch: str, kwargs: dict, sample: torch.Tensor) -> str:
    """Write ``model`` where the audits read it back; returns the format written."""
    if arch in ARCHITECTURES:
        save_state_dict(model, path, arch, kwargs)
        return "state_dict"
    with torch.no_grad():  # no trace check (a second tracing pass): the caller compares logits to the ONNX graph
        torch.jit.save(torch.jit.trace(model.eval(), sample, check_trace=False), str(path))
    path.with_suffix(".json").unlink(missing_ok=True)
    return "torchscript"
