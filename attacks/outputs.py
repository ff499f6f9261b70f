"""What a deployed model's first output holds, and how attacks get logits back from it.

Every attack here works on logits: cross-entropy of probabilities is never taken, and
saturated float32 probabilities would blind gradients and margins. Each convention's
inverse is exact where the output is not saturated, and order-preserving everywhere, so
the argmax (every success test) is the deployed output's.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

LOG_FLOOR = 1e-38  # probabilities below this (float32 underflow) are taken as this before the log
SIGMOID_CEIL = 1.0 - 2.0**-24  # the largest float32 below 1: a saturated Sigmoid reads as logit ~16.6


class OutputConvention(str, Enum):
    LOGITS = "logits"
    PROBABILITIES = "probabilities"  # a final Softmax: attacked on log-probabilities (logits + a per-row constant)
    SIGMOID = "sigmoid"  # a final element-wise Sigmoid: attacked on its logit, the pre-activation itself

    @classmethod
    def of_final_op(cls, op_type: str | None) -> OutputConvention:
        return {"Softmax": cls.PROBABILITIES, "Sigmoid": cls.SIGMOID}.get(op_type or "", cls.LOGITS)

    def to_logits(self, z: np.ndarray) -> np.ndarray:
        """Scores as logits (float32)."""
        if self is OutputConvention.PROBABILITIES:
            return np.log(np.maximum(z, LOG_FLOOR)).astype(np.float32)
        if self is OutputConvention.SIGMOID:
            p = np.clip(z.astype(np.float64), LOG_FLOOR, SIGMOID_CEIL)
            return (np.log(p) - np.log1p(-p)).astype(np.float32)
        return z

    def to_logits_torch(self, z):  # torch is imported by the caller; intake reads this enum without it
        import torch

        if self is OutputConvention.PROBABILITIES:
            return torch.log(torch.clamp(z, min=LOG_FLOOR))
        if self is OutputConvention.SIGMOID:
            return torch.logit(torch.clamp(z, LOG_FLOOR, SIGMOID_CEIL))
        return z

    def looks_like(self, z: np.ndarray) -> bool:
        """Scores that could be this convention's output (a source may return either)."""
        if not len(z):
            return False
        if self is OutputConvention.PROBABILITIES:
            return bool((z >= 0).all()) and bool(np.allclose(z.sum(1), 1.0, atol=1e-3))
        if self is OutputConvention.SIGMOID:
            return bool((z >= 0).all() and (z <= 1).all())
        return True

    def comparable(self, ref: np.ndarray) -> np.ndarray:
        """Where logits recovered from float32 outputs are exact enough to compare."""
        if self is OutputConvention.PROBABILITIES:
            return ref > -30  # probabilities underflow below e^-30 or so
        if self is OutputConvention.SIGMOID:
            # float32 spacing and onnxruntime's logistic approximation: logit error ~1e-7 * e**|z|,
            # measured under 3e-4 for |z| < 8 and 0.01 at 12 (below about -15 it returns 0)
            return np.abs(ref) < 8
        return np.ones(ref.shape, bool)
