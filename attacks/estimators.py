"""ART estimators for every way we can reach a model, each with a query counter.

* ``torch_classifier``: white-box ``PyTorchClassifier`` over a module returning logits.
* ``onnx_classifier``: black-box estimator over an onnxruntime session (ART has none),
  with scores (logits) or labels only (one-hot of the argmax, for decision attacks).
* ``StraightThrough``: BPDA module whose forward is the deployed onnxruntime output and
  whose backward is the float parent's gradient, so gradient attacks aim at the artifact
  that ships even when quantization rounding breaks its own gradients.

All estimators are told they see **logits**: ART mis-scales losses when probabilities
and logits are mixed up, so every module here is wrapped to return raw logits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from art.estimators.classification import BlackBoxClassifierNeuralNetwork, PyTorchClassifier
from torch import nn

from attacks.architectures import LogitsOnly
from attacks.outputs import OutputConvention

ClipValues = tuple[float, float]


#: Attribution: a queried row is matched to its nearest reference input among the
#: ``ATTRIBUTION_CANDIDATES`` nearest in a fixed random ``ATTRIBUTION_DIM``-d projection,
#: so each row costs O(24 D + 16 n) instead of a product with all n inputs (O(n D)).
ATTRIBUTION_DIM = 16
ATTRIBUTION_CANDIDATES = 8


class QueryCounter:
    """Counts model queries (input rows evaluated), in total and per original example.

    Attacks evaluate perturbed copies of the inputs in batches whose order we do not
    control, so each queried row is attributed to the nearest reference input;
    perturbations are much smaller than the gap between examples, so the nearest
    in a random projection's few nearest is the nearest (exact distances decide).
    """

    def __init__(self) -> None:
        self.total = 0
        self._ref: np.ndarray | None = None
        self.per_example: np.ndarray = np.zeros(0, dtype=np.int64)

    def set_reference(self, x: np.ndarray | None) -> None:
        self._ref = None if x is None or len(x) == 0 else x.reshape(len(x), -1).astype(np.float32)
        self.per_example = np.zeros(0 if x is None else len(x), dtype=np.int64)
        if self._ref is not None:
            rng = np.random.default_rng(0)
            self._proj = rng.standard_normal((self._ref.shape[1], ATTRIBUTION_DIM)).astype(np.float32)
            self._ref_proj = self._ref @ self._proj
            self._ref_proj_sq = (self._ref_proj * self._ref_proj).sum(1)
            self._ref_sq = (self._ref * self._ref).sum(1)

    def record(self, x: np.ndarray) -> None:
        n = len(x)
        self.total += n
        if self._ref is None or n == 0:
            return
        flat = x.reshape(n, -1).astype(np.float32)
        if flat.shape[1] != self._ref.shape[1]:
            return
        k = min(ATTRIBUTION_CANDIDATES, len(self._ref))
        p = flat @ self._proj
        near = self._ref_proj_sq[None, :] - 2.0 * p @ self._ref_proj.T
        cand = near.argsort(axis=1)[:, :k] if k == len(self._ref) else np.argpartition(near, k, axis=1)[:, :k]
        dots = np.stack([(flat * self._ref[cand[:, j]]).sum(1) for j in range(k)], axis=1)
        d = self._ref_sq[cand] - 2.0 * dots  # squared L2 up to the row's own |x|^2
        np.add.at(self.per_example, cand[np.arange(n), d.argmin(axis=1)], 1)




class OrtLogits:
    """Callable returning the deployed model's logits as float32, counting every row.

    ``convention``: what the output holds (``attacks.outputs``); probabilities come back
    as logits, so losses and margins are the ones on logits. The argmax, and so every
    success test, is that of the deployed output.
    """

    def __init__(self, session, input_name: str, logits_output: str, sample_shape: tuple[int, ...],
                 convention: OutputConvention = OutputConvention.LOGITS, row_by_row: bool = False) -> None:
        self.session = session
        self.row_by_row = row_by_row  # batch-dependent graphs (dynamic quantisation): one row per run
        self.input_name = input_name
        self.logits_output = logits_output
        self.sample_shape = tuple(sample_shape)
        self.convention = convention
        self.counter = QueryCounter()

    def __call__(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape((len(x), *self.sample_shape))
        self.counter.record(x)
        if self.row_by_row:
            batch = 1
        outs = [
            self.session.run([self.logits_output], {self.input_name: x[i : i + batch]})[0]
            for i in range(0, len(x), batch)
        ]
        if not outs:
            return np.zeros((0, 0), np.float32)
        z = np.concatenate(outs, axis=0).astype(np.float32)
        return self.convention.to_logits(z)

    def labels(self, x: np.ndarray) -> np.ndarray:
        return self(x).argmax(axis=1)


def image_view(sample_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A ``(1, h, w)`` view of flat samples for ART's Square attack (4-D images only).

    ``(1, 1, D)`` breaks ART 1.20's square sampling (it needs height > 1), so we use
    the most square factorisation ``h * w = D``; None when D is prime (Square skipped).
    """
    if len(sample_shape) != 1:
        return None
    d = int(sample_shape[0])
    h = max(k for k in range(1, int(d**0.5) + 1) if d % k == 0)
    return None if h == 1 else (1, h, d // h)


def onnx_classifier(
    ort_fn: OrtLogits,
    nb_classes: int,
    clip_values: ClipValues,
    labels_only: bool = False,
    view_shape: tuple[int, ...] | None = None,
) -> BlackBoxClassifierNeuralNetwork:
    """Black-box ART classifier over an onnxruntime session.

    ``view_shape`` lets an attack see a different sample shape (ART's Square attack only
    accepts 4-D images, so flat vectors are shown as ``image_view(D)``); rows are reshaped
    back before the session runs. ``labels_only`` returns one-hot argmax: what a
    decision-based attacker sees.
    """

    def predict(x: np.ndarray) -> np.ndarray:
        logits = ort_fn(x)
        if not labels_only:
            return logits
        return np.eye(nb_classes, dtype=np.float32)[logits.argmax(axis=1)]

    return BlackBoxClassifierNeuralNetwork(
        predict_fn=predict,
        input_shape=tuple(view_shape or ort_fn.sample_shape),
        nb_classes=nb_classes,
        channels_first=True,
        clip_values=clip_values,
    )


class _CountRows(nn.Module):
    """Counts rows through a torch module (one gradient or forward query per row)."""

    def __init__(self, inner: nn.Module, counter: QueryCounter) -> None:
        super().__init__()
        self.inner = inner
        self.counter = counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counter.record(x.detach().cpu().numpy())
        return self.inner(x)


class _Connected(nn.Module):
    """Keeps the output in the autograd graph of the input: a model whose output does not
    depend on its input differentiably (a threshold, a detach) then has an input gradient
    of exactly zero, which the self-checks report, instead of ``None``, on which ART crashes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        if x.requires_grad:
            z = z + 0.0 * x.reshape(len(x), -1).sum(1, keepdim=True)
        return z


def torch_classifier(
    module: nn.Module,
    input_shape: tuple[int, ...],
    nb_classes: int,
    clip_values: ClipValues,
    counter: QueryCounter | None = None,
) -> PyTorchClassifier:
    """White-box ART classifier; ``module`` may return logits or ``(logits, features)``.

    The loss is ``CrossEntropyLoss`` on raw logits (never softmax outputs).
    """
    model: nn.Module = _Connected(LogitsOnly(module)).eval()
    if counter is not None:
        model = _CountRows(model, counter)
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        channels_first=True,
        clip_values=clip_values,
        device_type="cpu",
    )


class StraightThrough(nn.Module):
    """BPDA: forward = deployed onnxruntime logits, backward = float parent's gradient.

    ``parent(x) + (ort(x) - parent(x)).detach()`` equals the artifact's logits exactly
    while its gradient is the parent's, so loss values, success tests and early stops
    inside ART all see the deployed model.
    """

    def __init__(self, parent: nn.Module, ort_fn: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__()
        self.parent = LogitsOnly(parent).eval()
        self.ort_fn = ort_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.parent(x)
        o = torch.from_numpy(self.ort_fn(x.detach().cpu().numpy())).to(p.dtype)
        return p + (o - p).detach()


class AsLogits(nn.Module):
    """A source that returns probabilities, seen as logits (``OutputConvention.to_logits_torch``),
    so ART's cross-entropy and DLR see logits."""

    def __init__(self, inner: nn.Module, convention: OutputConvention) -> None:
        super().__init__()
        self.inner = LogitsOnly(inner)
        self.convention = convention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convention.to_logits_torch(self.inner(x))


class ScaledLogits(nn.Module):
    """Logits times a constant ``factor`` < 1: same argmax and DLR, but a cross-entropy
    whose float32 gradient does not vanish when the model's logits are huge (a model whose
    logits are scaled by 1000 saturates softmax and blinds CE-based attacks)."""

    def __init__(self, inner: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner = LogitsOnly(inner)
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.factor


def torch_logits(module: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Logits of a torch module (or ``(logits, features)`` model) as numpy."""
    m = LogitsOnly(module).eval()
    with torch.no_grad():
        xs = [np.ascontiguousarray(x[i : i + batch], np.float32) for i in range(0, len(x), batch)]
        outs = [m(torch.from_numpy(b)) for b in xs]
    return torch.cat(outs).numpy()


def margin_input_gradients(module: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the logit margin ``z_y - max_{j!=y} z_j`` w.r.t. the input.

    Used by the gradient self-check: unlike cross-entropy on a very confident point
    (whose float32 gradient can underflow to exactly zero), the margin of a ReLU
    network only has a zero gradient when something really blocks it (rounding, a
    step function, ``detach``).
    """
    m = LogitsOnly(module).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).requires_grad_(True)
    z = m(xt)
    yt = torch.from_numpy(y.astype(np.int64))
    zy = z.gather(1, yt[:, None]).squeeze(1)
    other = z.masked_fill(nn.functional.one_hot(yt, z.shape[1]).bool(), float("-inf")).max(dim=1).values
    margin = (zy - other).sum()
    if not margin.requires_grad:  # the output does not depend on the input differentiably
        return np.zeros_like(x, dtype=np.float32)
    (g,) = torch.autograd.grad(margin, xt, allow_unused=True)
    return np.zeros_like(x, dtype=np.float32) if g is None else g.detach().numpy()


class _StraightThroughRounding(torch.overrides.TorchFunctionMode):
    """Inside this mode rounding-like ops keep their forward value but pass the gradient
    through unchanged (BPDA with g(x) ~ x, Athalye et al. 2018)."""

    OPS = {torch.round, torch.floor, torch.ceil, torch.trunc, torch.sign,
           torch.Tensor.round, torch.Tensor.floor, torch.Tensor.ceil, torch.Tensor.trunc, torch.Tensor.sign}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            x = args[0]
            return x + (out - x).detach()
        return out


class BPDARounding(nn.Module):
    """The same module with straight-through gradients for round/floor/ceil/trunc/sign,
    used when its own input gradients are exactly zero (a rounding layer masks them).

    Works on eager modules only: TorchScript bypasses torch function modes, so the audit
    prefers the straight-through copy of the deployed graph (``attacks.onnx_torch``) and
    only counts this route as restoring gradients after checking them."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        with _StraightThroughRounding():
            return self.inner(x)
