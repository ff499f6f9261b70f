"""Known PyTorch architectures, so a state dict can be loaded with ``weights_only=True``.

They live in ``attacks`` because the extraction thieves are built from them and the ART
estimators wrap models in ``LogitsOnly``; ``hardening.zoo`` re-exports them.

Every model returns ``(logits, features)``: the features are the penultimate
activations the OOD gate scores.
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Small CNN for 1x8x8 images in [0, 1]."""

    def __init__(self, num_classes: int = 6, width: int = 16, feature_dim: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.conv1(x))
        h = self.pool(torch.relu(self.conv2(h)))
        f = torch.relu(self.fc(h.flatten(1)))
        return self.head(f), f


class TabularMLP(nn.Module):
    """ReLU MLP for flat feature vectors in [0, 1]."""

    def __init__(self, in_features: int = 30, num_classes: int = 2, hidden: int = 32, feature_dim: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return self.head(f), f


class ImageCNN(nn.Module):
    """Small CNN for NCHW images of any channel count and size: ``blocks`` conv blocks (the
    first with stride ``stem_stride``, the rest stride 2), then average pooling to a
    ``grid`` x ``grid`` map, flattened, so the head does not depend on H x W. The default
    thief for image victims that are not the 1x8x8 demo; ``attacks.extraction.image_thief_kwargs``
    sizes it for the input (a strided stem above 95 px, blocks until the last map is at most
    6 px a side, a 2x2 grid): with the defaults here (three blocks, global pooling) a 96x96
    input leaves a 15 px receptive field and the layout is averaged away, which is why that
    thief could not copy a MobileNet at 3x96x96 (issue 15). Widths double per block up to
    ``4 * width``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16, feature_dim: int = 64,
                 stem_stride: int = 1, blocks: int = 3, grid: int = 1) -> None:
        super().__init__()
        chans = [in_channels, *(width * 2 ** min(i, 2) for i in range(blocks))]
        self.blocks = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=stem_stride if i == 0 else 2, padding=1),
                          nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(blocks)
        ])
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.fc = nn.Linear(chans[-1] * grid * grid, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.fc(self.pool(self.blocks(x)).flatten(1)))
        return self.head(f), f


ARCHITECTURES: dict[str, type[nn.Module]] = {"digits_cnn": DigitsCNN, "tabular_mlp": TabularMLP, "image_cnn": ImageCNN}
# Constructor arguments that set layer widths (``edgeward harden`` halves them for a student).
WIDTH_KWARGS: dict[str, tuple[str, ...]] = {"digits_cnn": ("width", "feature_dim"), "tabular_mlp": ("hidden", "feature_dim"),
                                            "image_cnn": ("width", "feature_dim")}


class LogitsOnly(nn.Module):
    """Wraps a ``(logits, features)`` model for tools that want one output (ART, pruning)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out
