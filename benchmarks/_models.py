"""Small torch models for the benchmarks, built here from seeded data (nothing downloaded).

Plain torch / onnxruntime code that does not import the audit, so a benchmark judges the
audit on a model it did not build. The tests' foreign models (tests/foreign_models.py)
import these too; no benchmark imports from tests/ (tests/test_layering.py).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class STRound(torch.autograd.Function):
    """Round with an identity backward: the test's own BPDA, independent of edgeward's."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class CNN3(nn.Module):
    """Three convolutions on 1x12x12 NCHW images, 5 classes."""

    def __init__(self, levels: int = 0, straight_through: bool = False) -> None:
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(16 * 3 * 3, 5)
        self.levels, self.straight_through, self.softmax, self.scale = levels, straight_through, False, 1.0

    def logits(self, x):
        if self.levels:
            r = STRound.apply(x * self.levels) if self.straight_through else torch.round(x * self.levels)
            x = r / self.levels
        return self.head(self.f(x).flatten(1))

    def forward(self, x):
        return self.logits(x)


class ResidualCNN(nn.Module):
    """A ResNet-style block (skip add), average pooling and global average pooling, 1x12x12, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.AvgPool2d(2)
        self.wide = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)
        self.softmax, self.scale = False, 1.0

    def logits(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        h = self.wide(self.pool(h))
        return self.head(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))

    def forward(self, x):
        return self.logits(x)


def cnn_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < 5
    x = torch.from_numpy((d.images[keep] / 16.0).astype(np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.numpy(), d.target[keep].astype(np.int64)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 300, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # seeded init, independent of the global RNG
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model.net(xt[idx]) if hasattr(model, "net") else model.logits(xt[idx]),
                                    yt[idx]).backward()
        opt.step()
    return model.eval()


def export(model: nn.Module, sample: np.ndarray, path: Path, input_name: str, output_name: str) -> Path:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    batch = torch.export.Dim("n", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model.eval(), (torch.from_numpy(sample[:2]),), input_names=[input_name],
                                 output_names=[output_name], dynamic_shapes=({0: batch},), dynamo=True,
                                 opset_version=18, verbose=False)
        prog.save(str(path))
    return path
