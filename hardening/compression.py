"""Compressed variants of a float model: int8 static (QDQ), int8 dynamic, magnitude pruning.

Quantization is onnxruntime's own (``onnxruntime.quantization``). Pruning fits the source
it has: a PyTorch source ``edgeward harden`` can train goes through harden's pruning
recipes (``hardening.harden.pruning``: torch-pruning channel removal, or
``torch.nn.utils.prune`` masks, then fine-tuning capped in time); without one, weights are
zeroed on the ONNX graph (``hardening.onnx_pruning``) at a sparsity chosen on held-out
data. A pruned variant that loses more accuracy than allowed is skipped with its reason,
never offered as a candidate. Every variant's recipe says how it was made and what it is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hardening.data import load_dataset
from hardening.errors import InputError, ModelError
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


PRUNED = ("pruned_unstructured", "pruned_structured")
DEFAULT_CHANNEL_RATIO = 0.3  # structured (the CLI repeats it); MobileNetV3 at 0.5 needs ~5 epochs to come back, 0.3 ~3
DEFAULT_MAX_DROP = 0.03  # held-out accuracy a pruned variant may lose vs float (the audit passes its policy's)
FINE_TUNE_SECONDS = {"quick": 25.0, "thorough": 240.0}  # fine-tuning cap per pruned variant, by profile
# a loaded machine never cuts fine-tuning below these (MobileNetV3, channel ratio 0.3: 0.897
# on x_cal after 1 epoch, ~0.94 after 3; float 0.953); unstructured 0.5 is back after one
MIN_EPOCHS = {"pruned_structured": 3, "pruned_unstructured": 1}
CHANNEL_MULTIPLE = 8  # structured: remaining channels of a reference network rounded to a multiple of 8
GRID_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the target sparsity: what the ONNX-level path tries


class _Skipped(Exception):
    """A pruned variant that is not a candidate: the reason and what was measured."""

    def __init__(self, reason: str, facts: dict) -> None:
        super().__init__(reason)
        self.reason, self.facts = reason, facts


def _heldout(ds, trained: bool) -> tuple[str, np.ndarray, np.ndarray]:
    """The split a pruned variant is judged on: the calibration split, else (when nothing was
    trained) the training split, else the evaluation split itself, named as such."""
    if ds.x_cal is not None and ds.y_cal is not None:
        return "x_cal", ds.x_cal, ds.y_cal
    if not trained and ds.x_train is not None and ds.y_train is not None:
        return "x_train", ds.x_train, ds.y_train
    return "x (the evaluation split: no held-out split in the data)", ds.x, ds.y


def _trainable(src: str | None, model_path: Path, ds):  # type: ignore[no-untyped-def]
    """harden's eager source for ``src`` (checked to be the model's own), or None and why not."""
    if src is None:
        return None, "no PyTorch source given"
    if ds.x_train is None or ds.y_train is None:
        return None, f"{ds.source}: no training split (x_train, y_train) to fine-tune on"
    from hardening.harden.pipeline import check_source_matches
    from hardening.harden.source import load_source

    try:
        source = load_source(src)
        check_source_matches(source.module, model_path, ds.x[:64], Path(src))
    except ModelError as e:
        return None, str(e)
    return source, ""


def _fine_tuned(kind: str, source, info, ds, out: Path, sparsity: float, profile: str) -> tuple[dict, str]:  # type: ignore[no-untyped-def]
    """Prune the source and fine-tune it with harden's recipe, capped in time; export the
    variant's ONNX graph and its own PyTorch source. Returns (recipe, source path)."""
    import torch

    from hardening.harden import pruning
    from hardening.harden.base import Timer
    from hardening.harden.pipeline import export_result, training_context, training_threads

    name = "prune_structured" if kind == "pruned_structured" else "prune_unstructured"
    caps = {name: {"ratio": sparsity, "max_seconds": FINE_TUNE_SECONDS[profile], "lr_schedule": "cosine",
                   "min_epochs": MIN_EPOCHS[kind], "round_to": CHANNEL_MULTIPLE}}
    ctx = training_context(source, ds, out, profile, seed=0, overrides=caps)
    dst, pt = out / f"{kind}.onnx", out / f"{kind}.pt"
    with training_threads(), Timer() as t:
        res = getattr(pruning, name)(ctx)
    fmt = export_result(res, pt, dst, torch.from_numpy(ds.x[:2]), info.input_name, ds.x[:64])
    return {**res.recipe, "path": f"fine-tuned from the PyTorch source (hardening.harden.pruning.{name})",
            "arch": res.arch, "source_format": fmt, "profile": profile, "train_and_prune_seconds": t.seconds}, str(pt)


def _onnx_chosen(kind: str, float_path: Path, dst: Path, split: tuple, float_acc: float, sparsity: float,
                 max_drop: float) -> dict:
    """No trainable source: zero weights on the ONNX graph at each sparsity of a small grid and
    keep the largest whose held-out accuracy is within ``max_drop`` of float's."""
    from hardening.harden.pipeline import onnx_accuracy
    from hardening.onnx_pruning import prune_onnx

    name, x, y = split
    grid = sorted({round(f * sparsity, 4) for f in GRID_FRACTIONS})
    measured, best = [], None
    for s in grid:
        cand = dst.with_name(f"{kind}.{s:g}.onnx")
        rec = prune_onnx(float_path, cand, s, structured=kind == "pruned_structured")
        acc = onnx_accuracy(cand, x, y)
        measured.append({"sparsity": s, "achieved_weight_sparsity": rec["achieved_weight_sparsity"],
                         "accuracy": acc, "drop": float_acc - acc})
        if float_acc - acc <= max_drop:
            if best is not None:
                best[1].unlink()
            best = (rec, cand)
        else:
            cand.unlink()
    facts = {"selection": {"rule": f"largest sparsity of the grid ({', '.join(f'{g:g}' for g in grid)}) "
                                   f"whose accuracy drop on {name} is at most {max_drop:g}",
                           "split": name, "float_accuracy": float_acc, "max_drop": max_drop, "grid": measured}}
    if best is None:
        closest = min(measured, key=lambda m: m["drop"])
        raise _Skipped(f"{kind}: no sparsity in {grid} keeps the accuracy on {name} within {max_drop:g} of float's "
                       f"{float_acc:.3f} without fine-tuning (best: {closest['accuracy']:.3f} at {closest['sparsity']:g})",
                       facts)
    rec, cand = best
    cand.replace(dst)
    how = "whole output channels" if kind == "pruned_structured" else "smallest magnitudes"
    return {**rec, **facts, "path": "ONNX graph, no fine-tuning", "physically_smaller": False,
            "what": f"{rec['achieved_weight_sparsity']:.0%} of the Conv/Gemm/MatMul weights zeroed in place ({how}, "
                    "dense graph): same file size and latency as float"}


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
    profile: str = "quick",
    channel_ratio: float = DEFAULT_CHANNEL_RATIO,
    max_accuracy_drop: float = DEFAULT_MAX_DROP,
) -> list[Variant]:
    """Write every requested variant to ``out_dir`` plus ``variants.json``; return them.

    Pruned variants fit the source: with a PyTorch source harden can train (a zoo state dict,
    a reference network's TorchScript or state dict) and a training split, harden's pruning
    recipe (``sparsity``: fraction of weights zeroed, unstructured; ``channel_ratio``: fraction
    of each layer's output channels removed, structured) with fine-tuning capped by
    ``FINE_TUNE_SECONDS[profile]``; otherwise weights zeroed on the ONNX graph at the largest
    value of a grid up to those targets that keeps the held-out accuracy within ``max_accuracy_drop``. A pruned
    variant that still loses more than that is not a candidate: it is left out of the
    returned list and recorded in ``variants.json`` as skipped, with the reason and the
    measurements (``skipped_variants``)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InputError(f"unknown variant kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if not 0.0 < sparsity < 1.0:
        raise InputError(f"sparsity must be in (0, 1), got {sparsity}")
    if not 0.0 < channel_ratio < 1.0:
        raise InputError(f"channel ratio must be in (0, 1), got {channel_ratio}")
    if profile not in FINE_TUNE_SECONDS:
        raise InputError(f"unknown profile {profile!r}; choose from {', '.join(FINE_TUNE_SECONDS)}")
    if not 0.0 <= max_accuracy_drop < 1.0:
        raise InputError(f"max accuracy drop must be in [0, 1), got {max_accuracy_drop}")
    info = load_model(model_path)
    ds = load_dataset(data_path)
    check_fits(info, ds)
    x_cal, _ = ds.calibration()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = str(torch_source) if torch_source else None

    variants: list[Variant] = []
    skipped: list[dict] = []
    float_path = out / "float.onnx"
    shutil.copyfile(model_path, float_path)
    trainable = _trainable(src, Path(model_path), ds) if set(kinds) & set(PRUNED) else (None, "")
    heldout_float: dict[str, float] = {}  # float's accuracy per held-out split, measured once
    for kind in kinds:
        dst = out / f"{kind}.onnx"
        variant_source = src
        t0 = time.perf_counter()
        if kind == "float":
            recipe = {"tool": "copy", "source": str(Path(model_path).resolve())}
        elif kind == "int8_static":
            recipe = _quantize_static(float_path, dst, info.input_name, x_cal, per_channel)
        elif kind == "int8_dynamic":
            recipe = _quantize_dynamic(float_path, dst)
        else:
            try:
                target = channel_ratio if kind == "pruned_structured" else sparsity
                recipe, own_source = _pruned(kind, trainable, float_path, info, ds, out, target, profile,
                                             max_accuracy_drop, heldout_float)
                variant_source = own_source or src  # fine-tuned: its own; zeroed on the graph: the parent's
            except _Skipped as e:
                skipped.append({"name": kind, "kind": kind, "parent": "float", "path": None, "skipped": e.reason,
                                "recipe": {**e.facts, "seconds": round(time.perf_counter() - t0, 3)}})
                continue
        if kind != "float":
            _drop_unused_opsets(dst)
        load_model(dst)  # every variant must pass intake itself
        recipe["seconds"] = round(time.perf_counter() - t0, 3)
        variants.append(
            Variant(kind, str(dst), kind, None if kind == "float" else "float", recipe, sha256_file(dst),
                    variant_source)
        )
    rows = [_stored(v, out) for v in variants] + skipped
    (out / VARIANTS_FILE).write_text(json.dumps(rows, indent=2))
    return variants


def _pruned(kind: str, trainable: tuple, float_path: Path, info, ds, out: Path, target: float, profile: str,  # type: ignore[no-untyped-def]
            max_drop: float, float_acc_by_split: dict[str, float]) -> tuple[dict, str | None]:
    """A pruned variant judged on held-out data: (recipe, its own PyTorch source or None) or ``_Skipped``."""
    from hardening.harden.pipeline import onnx_accuracy

    source, why = trainable
    if source is not None:
        split = _heldout(ds, trained=True)
        try:
            recipe, pt = _fine_tuned(kind, source, info, ds, out, target, profile)
        except (InputError, ModelError) as e:  # e.g. a zoo network whose pruned widths it cannot rebuild
            source, why = None, str(e)
    if source is None:
        split = _heldout(ds, trained=False)
    if split[0] not in float_acc_by_split:
        float_acc_by_split[split[0]] = onnx_accuracy(float_path, split[1], split[2])
    float_acc = float_acc_by_split[split[0]]
    if source is None:
        return {**_onnx_chosen(kind, float_path, out / f"{kind}.onnx", split, float_acc, target, max_drop),
                "why_onnx_level": why}, None
    acc = onnx_accuracy(out / f"{kind}.onnx", split[1], split[2])
    pruned_acc = recipe.get("heldout_accuracy_pruned") if split[0] == recipe.get("heldout_split") else None
    recipe["heldout"] = {"split": split[0], "float_accuracy": float_acc, "accuracy": acc, "drop": float_acc - acc,
                         "max_drop": max_drop, "accuracy_before_fine_tune": pruned_acc,
                         "accuracy_recovered": None if pruned_acc is None else acc - pruned_acc}
    if float_acc - acc > max_drop:
        for f in (out / f"{kind}.onnx", Path(pt), Path(pt).with_suffix(".json")):
            f.unlink(missing_ok=True)
        ft = recipe.get("fine_tune", {})
        raise _Skipped(f"{kind}: after pruning at {target:g} and {ft.get('epochs_completed')} fine-tuning epoch(s) "
                       f"({ft.get('stopped_by')}), accuracy on {split[0]} is {acc:.3f} vs float's {float_acc:.3f}: "
                       f"a drop above {max_drop:g}", recipe)
    return recipe, pt


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
        variants = [Variant(**r) for r in rows if not r.get("skipped")]
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{path}: not a valid variants file ({e})") from None
    for v in variants:
        v.path = str(resolve(v.path, path.parent))
        if v.torch_source:
            v.torch_source = str(resolve(v.torch_source, path.parent))
    return variants


def skipped_variants(path: str | Path) -> list[dict]:
    """The rows of a ``variants.json`` that ``compress`` recorded as skipped: name, kind, the
    reason (``skipped``) and what was measured (``recipe``)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a valid variants file ({e})") from None
    return [r for r in rows if isinstance(r, dict) and r.get("skipped")]
