"""The three views OOD detectors read: raw input, logits and penultimate features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from hardening.errors import ModelError


@dataclass
class ModelViews:
    """One batch of inputs with the model's outputs for them (float64, features may be None)."""

    input: np.ndarray
    logits: np.ndarray
    features: np.ndarray | None

    def __len__(self) -> int:
        return len(self.input)

    def get(self, view: str) -> np.ndarray:
        arr = getattr(self, view)
        if arr is None:
            raise ModelError(f"detector needs the model's {view!r} output, which this model does not have")
        return arr

    def take(self, idx: np.ndarray) -> ModelViews:
        return ModelViews(self.input[idx], self.logits[idx], None if self.features is None else self.features[idx])


def compute_views(
    sess: ort.InferenceSession,
    input_name: str,
    logits_output: str,
    features_output: str | None,
    x: np.ndarray,
    batch: int = 256,
) -> ModelViews:
    """Run the model once per batch and keep logits and (if present) features."""
    names = [logits_output] + ([features_output] if features_output else [])
    logits, feats = [], []
    for i in range(0, len(x), batch):
        outs = sess.run(names, {input_name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})
        logits.append(outs[0])
        if features_output:
            feats.append(outs[1].reshape(len(outs[1]), -1))
    return ModelViews(
        input=np.asarray(x, dtype=np.float64).reshape(len(x), -1),
        logits=np.concatenate(logits).astype(np.float64),
        features=np.concatenate(feats).astype(np.float64) if features_output else None,
    )
