"""Built-in demo models, trained locally in seconds with fixed seeds (nothing is downloaded).

``digits``: a CNN on scikit-learn's 8x8 digits, trained on classes 0-5 only so
digits 6-9 serve as near-OOD (``ood_heldout``). ``tabular``: a ReLU MLP on
scikit-learn's breast-cancer set, min-max scaled to [0, 1] with training
statistics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hardening.data import Dataset, save_dataset
from hardening.errors import InputError
from hardening.torch_source import export_onnx, save_state_dict
from hardening.zoo import ARCHITECTURES

DEMOS = ("digits", "tabular")
IN_CLASSES = 6  # digits 0-5 are in distribution


@dataclass(frozen=True)
class DemoArtifacts:
    name: str
    model_path: str
    torch_path: str
    data_path: str
    test_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def _splits(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """train 45% / cal 20% / test 20% / thief 15%, stratified."""
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, train_size=0.45, stratify=y, random_state=seed)
    x_cal, x_rest, y_cal, y_rest = train_test_split(x_rest, y_rest, train_size=20 / 55, stratify=y_rest, random_state=seed)
    x_te, x_th, y_te, y_th = train_test_split(x_rest, y_rest, train_size=20 / 35, stratify=y_rest, random_state=seed)
    return {"x_train": x_tr, "y_train": y_tr, "x_cal": x_cal, "y_cal": y_cal, "x": x_te, "y": y_te, "x_thief": x_th}


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx])[0], yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def _data(name: str, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str, dict]:
    if name == "digits":
        d = load_digits()
        x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        y = d.target.astype(np.int64)
        inside = y < IN_CLASSES
        splits = _splits(x[inside], y[inside], seed)
        return splits, {"heldout": x[~inside]}, "digits_cnn", {"num_classes": IN_CLASSES}
    d = load_breast_cancer()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    splits = _splits(x, y, seed)
    lo, hi = splits["x_train"].min(0), splits["x_train"].max(0)
    for k in ("x_train", "x_cal", "x", "x_thief"):
        splits[k] = np.clip((splits[k] - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return splits, {}, "tabular_mlp", {"in_features": x.shape[1], "num_classes": 2}


def build_demo(
    name: str,
    out_dir: str | Path,
    seed: int = 0,
    epochs: int = 30,
    weight_noise: float = 0.0,
) -> DemoArtifacts:
    """Train, export and save one demo; ``epochs``/``weight_noise`` make weaker variants for gate tests."""
    if name not in DEMOS:
        raise InputError(f"unknown demo {name!r}; choose from {', '.join(DEMOS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    splits, ood, arch, kwargs = _data(name, seed)
    model = ARCHITECTURES[arch](**kwargs)
    lr = 3e-3 if name == "digits" else 1e-2
    model = _train(model, splits["x_train"], splits["y_train"], epochs, seed, lr)
    if weight_noise > 0:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * weight_noise * p.std())
    with torch.no_grad():
        acc = float((model(torch.from_numpy(splits["x"]))[0].argmax(1).numpy() == splits["y"]).mean())

    ds = Dataset(
        x=splits["x"], y=splits["y"], x_train=splits["x_train"], y_train=splits["y_train"],
        x_cal=splits["x_cal"], y_cal=splits["y_cal"], x_thief=splits["x_thief"], ood=ood,
    )
    model_path, torch_path, data_path = out / "model.onnx", out / "model.pt", out / "data.npz"
    save_dataset(data_path, ds)
    save_state_dict(model, torch_path, arch, kwargs)
    export_onnx(model, torch.from_numpy(splits["x"][:2]), model_path)
    art = DemoArtifacts(name, str(model_path), str(torch_path), str(data_path), acc)
    (out / "demo.json").write_text(json.dumps(art.to_dict(), indent=2))
    return art
