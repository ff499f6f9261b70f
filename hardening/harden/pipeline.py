"""``harden()``: run recipes on a float model and its PyTorch source, write each result as an
ONNX variant + state dict + sidecar, and a ``variants.json`` that the audits read as is."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from hardening.compression import VARIANTS_FILE, Variant, _drop_unused_opsets, _stored
from hardening.data import Dataset, load_dataset
from hardening.errors import InputError, ModelError
from hardening.harden.base import PROFILES, Context, Result, Timer, check_training_data, parameters
from hardening.harden.quantization import parse_bits
from hardening.harden.registry import parse_recipes
from hardening.harden.source import Source, load_source, save_source
from hardening.intake import check_fits, load_model, make_session, sha256_file
from hardening.torch_source import export_onnx, load_torch_source

DEFAULT_EPS_FRACTION = 0.1  # of the data range: L-inf 0.1 on [0, 1] inputs
TRAIN_THREADS = 1


def onnx_accuracy(path: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    info = load_model(path)
    sess = make_session(path)
    out = sess.run([info.logits_output], {info.input_name: x})[0]
    return float((out.argmax(1) == y).mean())


def check_source_matches(module, model_path: Path, x: np.ndarray, src: Path) -> None:
    info = load_model(model_path)
    ort_out = make_session(model_path).run([info.logits_output], {info.input_name: x})[0]
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    tl = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    if tl.shape != ort_out.shape or not np.allclose(tl, ort_out, atol=1e-3, rtol=1e-3):
        raise ModelError(f"{src}: the PyTorch source's logits differ from {model_path.name}; harden starts from "
                         "the source's weights, so it must be the model's own source")


def training_context(source: Source, ds: Dataset, out: Path, profile: str, seed: int, eps: float | None = None,
                     quant_bits: str = "w4a8", overrides: dict | None = None) -> Context:
    """What a recipe runs on: the source's eager module, the data and its range, the L-inf
    budget (``DEFAULT_EPS_FRACTION`` of the range unless given) and the profile's budgets."""
    lo = float(min(a.min() for a in (ds.x, ds.x_train)))
    hi = float(max(a.max() for a in (ds.x, ds.x_train)))
    eps_v = DEFAULT_EPS_FRACTION * (hi - lo) if eps is None else float(eps)
    if not 0 < eps_v <= hi - lo:
        raise InputError(f"--eps {eps_v:g} must be in (0, {hi - lo:g}] (the data range)")
    return Context(teacher=source.module, arch=source.arch, kwargs=dict(source.kwargs), ds=ds, clip=(lo, hi),
                   eps=eps_v, seed=seed, profile=profile, out=out, quant_bits=quant_bits,
                   overrides=dict(overrides or {}))


@contextmanager
def training_threads():
    """One thread while recipes train: same reduction order, so a seed gives the same weights
    on any machine (the figures in docs/harden.md and the tests), and no contention on these
    small models. Torch's global RNG and thread count are restored after."""
    torch_state = torch.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        torch.set_num_threads(threads)


def export_result(res: Result, pt_path: Path, onnx_path: Path, sample: torch.Tensor, input_name: str,
                  x_check: np.ndarray) -> str:
    """Write a trained result as its own PyTorch source and an ONNX graph, check both (intake;
    the source reloads with weights_only=True and gives the graph's logits); the source format."""
    source_format = save_source(res.model, pt_path, res.arch, res.kwargs, sample)
    export_onnx(res.model, sample, onnx_path, input_name=input_name)
    load_model(onnx_path)
    check = load_torch_source(pt_path)
    check_source_matches(check, onnx_path, x_check, pt_path)
    return source_format


def harden(model_path: str | Path, torch_source: str | Path, data_path: str | Path, recipes: str,
           out_dir: str | Path, profile: str = "quick", eps: float | None = None, seed: int = 0,
           quant_bits: str = "w4a8", progress=None) -> list[Variant]:
    """Write ``float`` plus one variant per recipe to ``out_dir``, and ``variants.json``."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    chosen = parse_recipes(recipes)
    parse_bits(quant_bits)
    model_path, src = Path(model_path), Path(torch_source)
    source = load_source(src)
    info = load_model(model_path)
    ds = load_dataset(data_path)
    check_fits(info, ds)
    check_training_data(ds)
    teacher = source.module
    check_source_matches(teacher, model_path, ds.x[:64], src)
    out = Path(out_dir)
    ctx = training_context(source, ds, out, profile, seed, eps=eps, quant_bits=quant_bits)
    out.mkdir(parents=True, exist_ok=True)

    float_onnx, float_pt = out / "float.onnx", out / "float.pt"
    sample = torch.from_numpy(ds.x[:2])
    if model_path.resolve() != float_onnx.resolve():
        shutil.copyfile(model_path, float_onnx)
    if source.is_zoo or source.torchscript:  # the user's own file, readable by every audit as is
        if src.resolve() != float_pt.resolve():
            shutil.copyfile(src, float_pt)
        if source.is_zoo:
            float_pt.with_suffix(".json").write_text(json.dumps(source.sidecar(), indent=2))
    else:  # a reference network's state dict: the audits read TorchScript of it
        save_source(teacher, float_pt, source.arch, source.kwargs, sample)
    float_acc = onnx_accuracy(float_onnx, ds.x, ds.y)
    variants = [Variant("float", str(float_onnx), "float", None,
                        {"tool": "copy", "source": str(model_path.resolve()), "torch_source": str(src.resolve()),
                         "parameters": parameters(teacher), "accuracy": float_acc,
                         "size_bytes": float_onnx.stat().st_size},
                        sha256_file(float_onnx), str(float_pt))]
    with training_threads():
        for r in chosen:
            if progress:
                progress(r.name)
            onnx_path, pt_path = out / f"{r.name}.onnx", out / f"{r.name}.pt"
            if r.onnx_level:
                with Timer() as t:
                    rec = r.run(ctx, float_onnx, onnx_path)
                _drop_unused_opsets(onnx_path)
                load_model(onnx_path)
                variants.append(Variant(r.name, str(onnx_path), r.name, "float", {
                    **rec, "recipe": r.name, "family": r.family, "profile": profile,
                    "accuracy": onnx_accuracy(onnx_path, ds.x, ds.y), "parent_accuracy": float_acc,
                    "size_bytes": onnx_path.stat().st_size, "parent_size_bytes": float_onnx.stat().st_size,
                    "seconds": t.seconds}, sha256_file(onnx_path), str(float_pt)))
                continue
            with Timer() as t:
                res = r.run(ctx)
            exported = out / f"{r.name}.float.onnx" if r.post else onnx_path
            source_format = export_result(res, pt_path, exported, sample, info.input_name, ds.x[:64])
            extra: dict = {}
            if r.post:  # e.g. QAT: the trained float graph becomes QDQ; its source is the float latent weights
                extra = r.post(ctx, res, exported, onnx_path)
                exported.unlink()
                _drop_unused_opsets(onnx_path)
                load_model(onnx_path)
            recipe = {**res.recipe, **extra, "recipe": r.name, "family": r.family, "profile": profile,
                      "arch": res.arch, "kwargs": res.kwargs, "source_format": source_format,
                      "parameters": parameters(res.model),
                      "accuracy": onnx_accuracy(onnx_path, ds.x, ds.y), "parent_accuracy": float_acc,
                      "size_bytes": onnx_path.stat().st_size, "parent_size_bytes": float_onnx.stat().st_size,
                      "torch_threads": TRAIN_THREADS, "seconds": t.seconds}
            variants.append(Variant(r.name, str(onnx_path), r.name, "float", recipe, sha256_file(onnx_path),
                                    str(pt_path)))
    (out / VARIANTS_FILE).write_text(json.dumps([_stored(v, out) for v in variants], indent=2))
    return variants
