"""``edgeward harden``: make a model harder or smaller from its PyTorch source.

One module per recipe family (``adversarial``, ``distillation``, ``pruning``, ``quantization``,
``lowbit``, ``pt2e``), the source loader (``source``: zoo and reference networks, state dict or
TorchScript), a registry (``registry``) and the pipeline that writes variants the audits read
(``pipeline``).
"""

from hardening.harden.pipeline import harden
from hardening.harden.registry import RECIPE_NAMES, parse_recipes

__all__ = ["RECIPE_NAMES", "harden", "parse_recipes"]
