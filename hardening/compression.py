"""Compressed variants of a float model: int8 static (QDQ), int8 dynamic, magnitude pruning.

Quantization is onnxruntime's own (``onnxruntime.quantization``) and pruning is
``torch.nn.utils.prune``; we only choose settings and record them, so every
variant says how it was made.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hardening.data import load_dataset
from hardening.errors import InputError
from hardening.intake import check_fits, load_model, sha256_file
from hardening.paths import portable, resolve

KINDS = ("float", "int8_static", "int8_dynamic", "pruned_unstructured", "pruned_structured")
VARIANTS_FILE = "variants.json"


@dataclass
class Variant:
    """One model file and the recipe that produced it."""

    name: str
    path: str
    kind: str
    parent: str | None
    recipe: dict = field(default_factory=dict)
    sha256: str = ""
    torch_source: str | None = None  # float parent's PyTorch source, for white-box attacks

    def to_dict(self) -> dict:
        return asdict(self)


class _CalibrationReader:
    """Feeds the calibration split to ``quantize_static`` in small batches."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax calibration
        raise NotImplementedError


def _quantize_static(src: Path, dst: Path, input_name: str, x_cal: np.ndarray, per_channel: bool) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        pre = _pre_processed(src, Path(tmp))
        quantize_static(
            str(pre),
            str(dst),
            _CalibrationReader(input_name, x_cal),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "pre_process": "quant_pre_process",
        "activations": "uint8",
        "weights": "int8",
        "per_channel": per_channel,
        "calibration": "MinMax",
        "calibration_samples": int(len(x_cal)),
    }


def _quantize_dynamic(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(str(_pre_processed(src, Path(tmp))), str(dst), weight_type=QuantType.QInt8)
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "pre_process": "quant_pre_process",
            "weights": "int8", "activations": "dynamic uint8"}


def _pre_processed(src: Path, tmp: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, graph optimisation), which
    both quantizers expect; it tags the model so they do not warn that it is missing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    return pre


def _prune(torch_source: str, sample: np.ndarray, dst: Path, sparsity: float, structured: bool) -> dict | None:
    """torch.nn.utils.prune on the source's Conv2d/Linear modules and a fresh export; None when
    the source has none it can re-parametrise (a TorchScript module's layers are not nn.Conv2d)."""
    import torch
    from torch import nn
    from torch.nn.utils import prune

    from hardening.torch_source import export_onnx, load_torch_source

    model = copy.deepcopy(load_torch_source(torch_source))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        return None
    if structured:
        # Whole output channels/neurons, by L2 norm; the classifier head keeps all its classes.
        for m in layers[:-1]:
            prune.ln_structured(m, "weight", amount=sparsity, n=2, dim=0)
    else:
        prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=sparsity)
    for m in layers:
        if prune.is_pruned(m):
            prune.remove(m, "weight")
    total = sum(m.weight.numel() for m in layers)
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    export_onnx(model, torch.from_numpy(sample[:2]), dst)
    return {
        "tool": "torch.nn.utils.prune." + ("ln_structured(n=2, dim=0)" if structured else "global_unstructured(L1)"),
        "target_sparsity": sparsity,
        "achieved_weight_sparsity": zeros / total,
        "layers": len(layers) - (1 if structured else 0),
    }


def _pruned(src: str | None, float_path: Path, sample: np.ndarray, dst: Path, sparsity: float,
            structured: bool) -> dict:
    """Prune through the source when torch can, else on the ONNX graph; the recipe says which and why."""
    recipe = _prune(src, sample, dst, sparsity, structured) if src else None
    if recipe is not None:
        return recipe
    from hardening.onnx_pruning import prune_onnx

    why = ("no PyTorch source given" if src is None else
           f"{Path(src).name}: no nn.Conv2d/nn.Linear modules torch.nn.utils.prune can re-parametrise "
           "(e.g. a TorchScript source)")
    return {**prune_onnx(float_path, dst, sparsity, structured), "why_onnx_level": why}


def _drop_unused_opsets(path: Path) -> None:
    """onnxruntime's optimizer declares every domain it knows; keep only those nodes use,
    so the runtime's domain allow-list judges what the model really runs."""
    import onnx

    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))


def compress(
    model_path: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    torch_source: str | Path | None = None,
    kinds: tuple[str, ...] = KINDS,
    sparsity: float = 0.5,
    per_channel: bool = True,
) -> list[Variant]:
    """Write every requested variant to ``out_dir`` plus ``variants.json``; return them."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown variant kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if not 0.0 < sparsity < 1.0:
        raise InputError(f"sparsity must be in (0, 1), got {sparsity}")
    info = load_model(model_path)
    ds = load_dataset(data_path)
    check_fits(info, ds)
    x_cal, _ = ds.calibration()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = str(torch_source) if torch_source else None

    variants: list[Variant] = []
    float_path = out / "float.onnx"
    shutil.copyfile(model_path, float_path)
    for kind in kinds:
        dst = out / f"{kind}.onnx"
        if kind == "float":
            recipe = {"tool": "copy", "source": str(Path(model_path).resolve())}
        elif kind == "int8_static":
            recipe = _quantize_static(float_path, dst, info.input_name, x_cal, per_channel)
        elif kind == "int8_dynamic":
            recipe = _quantize_dynamic(float_path, dst)
        else:
            recipe = _pruned(src, float_path, ds.x, dst, sparsity, structured=kind == "pruned_structured")
        if kind != "float":
            _drop_unused_opsets(dst)
        load_model(dst)  # every variant must pass intake itself
        variants.append(
            Variant(kind, str(dst), kind, None if kind == "float" else "float", recipe, sha256_file(dst), src)
        )
    (out / VARIANTS_FILE).write_text(json.dumps([_stored(v, out) for v in variants], indent=2))
    return variants


def _stored(v: Variant, folder: Path) -> dict:
    d = v.to_dict()
    d["path"] = portable(v.path, folder)
    if v.torch_source:
        d["torch_source"] = portable(v.torch_source, folder)
    return d


def load_variants(path: str | Path) -> list[Variant]:
    """Read a ``variants.json``; relative paths resolve against its folder (``hardening.paths``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
        variants = [Variant(**r) for r in rows]
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{path}: not a valid variants file ({e})") from None
    for v in variants:
        v.path = str(resolve(v.path, path.parent))
        if v.torch_source:
            v.torch_source = str(resolve(v.torch_source, path.parent))
    return variants
