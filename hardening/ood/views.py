"""The three views OOD detectors read: the compact input view, logits and penultimate features.

The compact input view (``runtime_guard.anomaly.InputView``) is chosen here at fit time from
the input's shape, recorded in the detector file and applied by the same code on the device:
input-space detectors then cost what the model's size allows, not what the input's size is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from sklearn.random_projection import GaussianRandomProjection

from hardening.errors import ModelError
from hardening.ood.budget import GateBudget
from runtime_guard.anomaly import InputView

# Values per sample of the compact input view (``GateBudget.input_values``): a 3x96x96 image
# average-pools to 3x8x8 (192).
MAX_INPUT_VALUES = GateBudget().input_values
# A projection of a flat input costs D x m per request: m is bounded by this budget too.
MAX_PROJECTION_VALUES = 2**18


def choose_input_view(shape: tuple[int, ...], max_values: int = MAX_INPUT_VALUES, seed: int = 0) -> InputView:
    """``flatten`` when the input has at most ``max_values`` values; an NCHW (or HW) image
    average-pooled by the smallest factor that fits, or by the next larger factor that
    divides the image into equal bins when that keeps at least half the values (the device
    pools equal bins with one gemv and one small product); otherwise a seeded Gaussian random
    projection (scikit-learn) to ``min(max_values, MAX_PROJECTION_VALUES // D)`` values."""
    shape = tuple(int(v) for v in shape)
    size = math.prod(shape)
    if size <= max_values:
        return InputView("flatten", shape)
    if len(shape) in (2, 3):
        c, h, w = (1, *shape) if len(shape) == 2 else shape
        f = max(1, math.isqrt(max(size // max_values, 1)))
        while c * -(-h // f) * -(-w // f) > max_values and (f < h or f < w):
            f += 1
        oh, ow = -(-h // f), -(-w // f)
        if c * oh * ow <= max_values:
            even = [(a, b) for a in range(1, oh + 1) for b in range(1, ow + 1)
                    if h % a == 0 and w % b == 0 and 2 * a * b >= oh * ow and max(a / b, b / a) <= max(oh / ow, ow / oh)]
            if even and (oh, ow) not in even:
                oh, ow = max(even, key=lambda ab: (ab[0] * ab[1], -abs(ab[0] - ab[1])))
            return InputView("avgpool", (c, h, w), (oh, ow))
    m = max(8, min(max_values, MAX_PROJECTION_VALUES // size))
    proj = GaussianRandomProjection(n_components=m, random_state=seed).fit(np.zeros((1, size)))
    return InputView("projection", shape, matrix=np.asarray(proj.components_.T, np.float32))


@dataclass
class ModelViews:
    """One batch of inputs (the compact input view) with the model's outputs for them
    (float32, features may be None)."""

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
    input_view: InputView | None = None,
) -> ModelViews:
    """Run the model once per batch and keep the compact input view, logits and (if
    present) features: memory grows with the views, not with a float64 copy of ``x``."""
    view = input_view or InputView()
    names = [logits_output] + ([features_output] if features_output else [])
    inputs, logits, feats = [], [], []
    for i in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[i : i + batch], dtype=np.float32)
        outs = sess.run(names, {input_name: xb})
        inputs.append(view.apply(xb))
        logits.append(outs[0].astype(np.float32))
        if features_output:
            feats.append(outs[1].reshape(len(outs[1]), -1).astype(np.float32))
    return ModelViews(
        input=np.concatenate(inputs),
        logits=np.concatenate(logits),
        features=np.concatenate(feats) if features_output else None,
    )
