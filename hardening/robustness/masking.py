"""A deliberately gradient-masked model, to prove the self-checks catch masking.

``RoundInput`` rounds inputs to a grid before the real model (the digits demo's own
1/16 resolution, so clean accuracy is unchanged) and therefore has an exactly zero
input gradient everywhere: naive white-box attacks report it as very robust while it
is not (Athalye et al. 2018).
"""

from __future__ import annotations

import torch
from torch import nn


class RoundInput(nn.Module):
    def __init__(self, inner: nn.Module, levels: int = 16) -> None:
        super().__init__()
        self.inner = inner
        self.levels = levels

    def forward(self, x: torch.Tensor):
        return self.inner(torch.round(x * self.levels) / self.levels)
