"""Load a model's PyTorch source: TorchScript, or a state dict of a known architecture.

A state dict ``model.pt`` comes with ``model.json`` beside it (or an explicit
``arch``) naming the architecture and its constructor arguments. State dicts are
read with ``weights_only=True`` so no pickled code runs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch import nn

from hardening.errors import ModelError
from hardening.zoo import ARCHITECTURES


def load_torch_source(path: str | Path, arch: dict | None = None) -> nn.Module:
    """Return the model in eval mode; it must return logits or ``(logits, features)``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: PyTorch source not found")
    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a PyTorch file (expected a TorchScript or state-dict zip)")
    with zipfile.ZipFile(path) as z:
        is_script = any(n.endswith("/code/__torch__.py") or "/code/" in n for n in z.namelist())
    if is_script:
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise ModelError(f"{path}: TorchScript load failed: {str(e).splitlines()[0]}") from None
    if arch is None:
        arch = read_sidecar(path)
    name = arch.get("arch")
    if name not in ARCHITECTURES:
        raise ModelError(f"{path}: unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[name](**arch.get("kwargs", {}))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: state dict does not fit {name}: {str(e).splitlines()[0][:200]}") from None
    return model.eval()


def save_state_dict(model: nn.Module, path: str | Path, arch: str, kwargs: dict) -> None:
    torch.save(model.state_dict(), path)
    Path(path).with_suffix(".json").write_text(json.dumps({"arch": arch, "kwargs": kwargs}, indent=2))


def read_sidecar(path: Path) -> dict:
    """The ``<state dict>.json`` naming a state dict's architecture and its kwargs."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise ModelError(f"{path}: state dict needs {sidecar.name} naming its architecture")
    try:
        spec: dict = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{sidecar}: invalid JSON ({e})") from None
    return spec


def export_onnx(model: nn.Module, sample: torch.Tensor, path: str | Path, input_name: str = "input") -> None:
    """Export with a dynamic batch and outputs ``logits`` and ``features`` (``logits`` alone
    for a model that returns one tensor)."""
    import logging
    import warnings

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        two = isinstance(model(sample), (tuple, list))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            (sample,),
            input_names=[input_name],
            output_names=["logits", "features"] if two else ["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            opset_version=18,
            verbose=False,
        )
        prog.save(str(path), external_data=False)
    _strip_debug_info(path)


def _strip_debug_info(path: str | Path) -> None:
    """Drop exporter stack-trace metadata and cached shapes: bytes on device, no behaviour."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.metadata_props[:]
    onnx.save(model, str(path))
