"""Models edgeward did not build, and an independent reference attack, for the audit's honesty tests.

Everything here is plain torch / onnxruntime code that does not import the audit: the
models are trained in the test session from seeded data, exported with torch's own
exporter under names edgeward does not use, quantised with onnxruntime.quantization, and
attacked by a plain margin-loss PGD whose gradients come from the test's own
straight-through copy of each model. Success is judged on the onnxruntime session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

# the models and training the benchmarks share (repo root on sys.path: pytest's pythonpath)
from benchmarks._models import CNN3, ResidualCNN, STRound, cnn_data, export, train

__all__ = ["CNN3", "MLP", "Deployed", "ResidualCNN", "STRound", "cnn_data", "export", "mlp_data", "quantize",
           "reference_pgd", "train"]


class MLP(nn.Module):
    """Flat input, 4 classes; optional input quantisation, logit scale and final Softmax or Sigmoid."""

    def __init__(self, d: int = 20, classes: int = 4, levels: int = 0, scale: float = 1.0, softmax: bool = False,
                 straight_through: bool = False, threshold: float | None = None, sigmoid: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))
        self.levels, self.scale, self.softmax, self.straight_through = levels, scale, softmax, straight_through
        self.threshold = threshold  # binarise the input (a comparison feeding Where)
        self.sigmoid = sigmoid

    def logits(self, x):
        if self.threshold is not None:
            b = torch.where(x > self.threshold, 1.0, 0.0)
            x = x + (b - x).detach() if self.straight_through else b
        if self.levels:
            r = STRound.apply(x * self.levels) if self.straight_through else torch.round(x * self.levels)
            x = r / self.levels
        return self.net(x) * self.scale

    def forward(self, x):
        z = self.logits(x)
        if self.sigmoid:
            return torch.sigmoid(z)
        return torch.softmax(z, dim=1) if self.softmax else z


def mlp_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=600, n_features=20, n_informative=12, n_redundant=2, n_classes=4,
                               n_clusters_per_class=1, class_sep=2.0, random_state=seed)
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    return x.astype(np.float32), y.astype(np.int64)


class _Reader:
    def __init__(self, name: str, x: np.ndarray) -> None:
        self.it = iter([{name: x[i:i + 32]} for i in range(0, len(x), 32)])

    def get_next(self):
        return next(self.it, None)


def quantize(src: Path, x_cal: np.ndarray, input_name: str, kind: str) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    dst = src.with_name(f"{src.stem}_{kind}.onnx")
    logging.getLogger().setLevel(logging.ERROR)
    if kind in ("static", "qoperator", "qoperator-per-channel"):
        fmt = QuantFormat.QDQ if kind == "static" else QuantFormat.QOperator
        quantize_static(str(src), str(dst), _Reader(input_name, x_cal), quant_format=fmt,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=kind.endswith("per-channel"))
    else:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return dst


@dataclass
class Deployed:
    """An onnxruntime session and its first output (probabilities or logits)."""

    path: Path
    input_name: str

    def __post_init__(self) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]

    def labels(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x).argmax(1)


def reference_pgd(deployed: Deployed, st_model: nn.Module, x: np.ndarray, y: np.ndarray, eps: float,
                  steps: int = 50, restarts: int = 2, seed: int = 0, lo: float = 0.0, hi: float = 1.0,
                  forward_from_session: bool = False) -> float:
    """Robust accuracy under margin-loss L-inf PGD, judged on the session.

    Gradients: ``st_model.logits`` (the test's straight-through copy; pre-Softmax, so no
    saturation). ``forward_from_session``: for int8 variants, the loss is computed at
    the session's logits (``st + (ort - st).detach()``), the classic BPDA surrogate.
    """
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    robust = deployed.labels(x) == y
    for r in range(restarts):
        start = torch.zeros_like(xt) if r == 0 else (torch.rand(xt.shape, generator=g) * 2 - 1) * eps
        adv = (xt + start).clamp(lo, hi)
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            z = st_model.logits(adv)
            if forward_from_session:
                o = deployed.scores(adv.detach().numpy())
                if getattr(st_model, "softmax", False):
                    o = np.log(np.maximum(o, 1e-38))
                z = z + (torch.from_numpy(o) - z).detach()
            zy = z.gather(1, yt[:, None]).squeeze(1)
            other = z.masked_fill(nn.functional.one_hot(yt, z.shape[1]).bool(), -1e9).amax(1)
            (other - zy).sum().backward()
            with torch.no_grad():
                adv = adv + (eps / 8) * adv.grad.sign()
                adv = torch.min(torch.max(adv, xt - eps), xt + eps).clamp(lo, hi)
            robust &= deployed.labels(adv.detach().numpy()) == y
    return float(robust.mean())
