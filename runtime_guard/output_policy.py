"""Output policies: how much of the model's belief a client gets to see.

Full probability vectors make model extraction and membership inference much
cheaper, so the publisher can truncate (top-k), coarsen (rounded), drop them
(label-only), perturb them while keeping the top-1 answer (reverse sigmoid,
Lee et al. 2019, "Defending against NN model stealing attacks using deceptive
perturbations"), or lie only to inputs the OOD gate calls out-of-distribution
(adaptive misinformation, Kariyappa & Qureshi 2020, "Defending against model
stealing attacks with adaptive misinformation").

Softmax is applied first (in float64); the returned labels are the raw model's
argmax for every row except OOD rows under adaptive misinformation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import PartsMismatch

if TYPE_CHECKING:  # config validates policy names against OUTPUT_POLICIES below
    from .config import OutputPolicyConfig

__all__ = ["OUTPUT_POLICIES", "softmax", "OutputPolicy"]

# Every policy the runtime can apply; the one list (config validation, audits, CLI help).
OUTPUT_POLICIES = ("full", "top_k", "rounded", "label_only", "reverse_sigmoid", "adaptive_misinformation")

_EPS = 1e-9  # same clipping as ART's ReverseSigmoid


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _reverse_sigmoid(p: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """y - beta * (sigmoid(gamma * logit(y)) - 1/2), clipped at 0 and renormalised.

    The perturbation is largest for confident classes, which flattens the
    vector and misleads gradient/KD-based thieves. Lee et al.'s guarantee on
    the top-1 class depends on beta/gamma, so we enforce it: if the perturbed
    argmax moved, the two entries are swapped.
    """
    q = np.clip(p, _EPS, 1 - _EPS)
    s = 1.0 / (1.0 + np.exp(-gamma * np.log(q / (1 - q))))
    out = np.clip(p - beta * (s - 0.5), 0.0, 1.0)
    total = out.sum(axis=1, keepdims=True)
    out = np.where(total > 0, out / np.where(total > 0, total, 1), p)
    return _force_top1(out, p.argmax(axis=1))


def _force_top1(out: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Make ``top`` the strict argmax of each row: swap it with the current
    maximum, then break any remaining tie by one ulp (order-preserving renorm)."""
    rows = np.arange(len(out))
    mx = out.max(axis=1)
    bad = np.nonzero((out[rows, top] < mx) | ((out == mx[:, None]).sum(axis=1) > 1))[0]
    if bad.size:
        t, a = top[bad], out[bad].argmax(axis=1)
        hi, lo = out[bad, a].copy(), out[bad, t].copy()
        out[bad, a], out[bad, t] = lo, hi
        out[bad, t] = np.nextafter(hi, np.inf)
        out[bad] /= out[bad].sum(axis=1, keepdims=True)
    return out


def _misinformation(logits: np.ndarray) -> np.ndarray:
    """A plausible-looking but wrong distribution: softmax of the negated logits
    puts most mass on the classes the model believes least (stands in for
    Kariyappa & Qureshi's trained misinformation network, which we cannot
    ship in a runtime without torch)."""
    return softmax(-logits)


class OutputPolicy:
    """``apply(logits, ood)`` -> ``(labels [N] int64, scores [N, C] float64)``.

    ``ood`` is the gate's boolean verdict per row (None when the gate is off).
    Scores are always dense ``[N, C]``: hidden classes are 0, label-only is one-hot.
    """

    def __init__(self, config: OutputPolicyConfig) -> None:
        self.config = config
        self.name = config.policy

    def apply(self, logits: np.ndarray, ood: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.apply_labelled(logits, ood, logits.argmax(axis=1))

    def apply_labelled(
        self, logits: np.ndarray, ood: np.ndarray | None, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``apply`` for a caller that already has ``logits.argmax(axis=1)`` (the guard's hot path)."""
        cfg = self.config
        name = self.name
        if name == "full":
            return labels, softmax(logits)
        if name == "label_only":
            scores = np.zeros(logits.shape, dtype=np.float64)
            scores[np.arange(len(labels)), labels] = 1.0
            return labels, scores
        p = softmax(logits)
        if name == "full":
            return labels, p
        if name == "rounded":
            return labels, np.round(p, cfg.decimals)
        if name == "top_k":
            k = min(cfg.k, p.shape[1])
            keep = np.argpartition(-p, k - 1, axis=1)[:, :k]
            scores = np.zeros_like(p)
            rows = np.arange(len(p))[:, None]
            scores[rows, keep] = p[rows, keep]
            return labels, scores
        if name == "reverse_sigmoid":
            return labels, _reverse_sigmoid(p, cfg.beta, cfg.gamma)
        if name == "adaptive_misinformation":
            if ood is None:
                raise PartsMismatch("adaptive_misinformation needs the OOD gate's verdicts")
            if ood.any():
                p = p.copy()
                p[ood] = _misinformation(logits[ood])
                labels = labels.copy()
                labels[ood] = p[ood].argmax(axis=1)
            return labels, p
        raise PartsMismatch(f"unknown output policy {name!r}")
