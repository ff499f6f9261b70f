"""A differentiable torch copy of the runtime anomaly gate, for attackers who know it.

``TorchGate`` reads what ships, as the runtime parsed it (``AnomalyScorer.detectors`` and
``AnomalyScorer.input_view``, loaded from ``detectors.npz``/``detectors.json``: old files
included), and recomputes the compact input view, every fused detector and the fusion
rule with torch ops (float64, on the runtime's float32 arrays), so an adaptive attack can follow the
gradient of the fused score. It is a *copy*: ``check_copy`` compares it with the
runtime scorer on real inputs, and tests do the same, so a change to the runtime's
detectors or fusion breaks loudly instead of letting the copy drift. A fusion rule or
detector kind the copy does not know raises ``GateCopyError``; the audit then says the
adaptive white-box attack could not run (it does not fall back silently).

The minimum in Mahalanobis / k-th neighbour distances is kept exact (its gradient
flows through the arg-min), so forward values equal the runtime's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime_guard.anomaly import AnomalyScorer, Detector, InputView, Knn, Mahalanobis, Pca, Softmax
from runtime_guard.gate_graph import pool_matrix

FUSION_RULES = ("mean_z", "mean_pos_z", "max_z")  # runtime_guard.anomaly.fuse_z


class GateCopyError(Exception):
    """The exported gate uses a detector kind or fusion rule this copy cannot reproduce."""


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


class _InputView(nn.Module):
    """``runtime_guard.anomaly.InputView.apply`` in torch (flatten, avgpool, projection)."""

    def __init__(self, view: InputView) -> None:
        super().__init__()
        self.kind, self.shape = view.kind, view.shape
        if view.kind == "avgpool":
            assert view.shape is not None and view.out is not None
            self.register_buffer("rows", _t(pool_matrix(view.shape[1], view.out[0]).astype(np.float32)))
            self.register_buffer("cols_t", _t(pool_matrix(view.shape[2], view.out[1]).T.astype(np.float32)))
        elif view.kind == "projection":
            assert view.matrix is not None
            self.register_buffer("matrix", _t(view.matrix.astype(np.float32)))
        elif view.kind != "flatten":
            raise GateCopyError(f"input view {view.kind!r} has no torch copy")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        if self.kind == "avgpool":
            assert self.shape is not None
            return (self.rows @ x.reshape(len(x), *self.shape) @ self.cols_t).reshape(len(x), -1)
        flat = x.reshape(len(x), -1)
        return flat @ self.matrix if self.kind == "projection" else flat


class _Detector(nn.Module):
    def __init__(self, det: Detector) -> None:
        super().__init__()
        self.name, self.view = det.name, det.view
        self.mean, self.std = det.mean, det.std
        if isinstance(det, Softmax):
            self.kind, self.temperature = det.kind, det.temperature
        elif isinstance(det, Mahalanobis):
            self.kind = "mahalanobis"
            self.register_buffer("factor", _t(det.factor.astype(np.float32)))
            self.register_buffer("centers", _t(det.centers))
        elif isinstance(det, Knn):
            self.kind = "knn"
            self.k, self.normalize = det.n_neighbors, det.normalize
            self.register_buffer("bank", _t(det.bank.astype(np.float32)))
        elif isinstance(det, Pca):
            self.kind = "pca"
            self.register_buffer("pmean", _t(det.center.astype(np.float32)))
            self.register_buffer("components", _t(det.components.astype(np.float32)))
        else:
            raise GateCopyError(f"detector '{det.name}': {type(det).__name__} has no torch copy")

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind in ("energy", "msp"):
            t = self.temperature
            if self.kind == "energy":
                return -t * torch.logsumexp(v / t, dim=1)
            return 1.0 - torch.softmax(v / t, dim=1).max(dim=1).values
        if self.kind == "mahalanobis":  # min_c |v W - m_c|^2
            s = v @ self.factor
            return ((s[:, None, :] - self.centers[None]) ** 2).sum(2).min(dim=1).values
        if self.kind == "knn":
            if self.normalize:
                v = v / torch.clamp(v.norm(dim=1, keepdim=True), min=1e-12)
            dist2 = (v * v).sum(1, keepdim=True) - 2.0 * v @ self.bank.T + (self.bank * self.bank).sum(1)[None, :]
            kth = torch.kthvalue(dist2, min(self.k, dist2.shape[1]), dim=1).values
            return torch.sqrt(torch.clamp(kth, min=0.0) + 1e-30)
        c = v - self.pmean  # pca
        r = c - (c @ self.components.T) @ self.components
        return (r * r).sum(1)


class TorchGate(nn.Module):
    """Fused anomaly score (higher = more anomalous) of ``(input, logits, features)``, float64."""

    def __init__(self, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.rule = scorer.rule
        if self.rule not in FUSION_RULES:
            raise GateCopyError(f"fusion rule {self.rule!r} has no torch copy (known: {', '.join(FUSION_RULES)})")
        members = set((scorer.meta.get("fusion") or {}).get("members") or [])
        self.input_view = _InputView(scorer.input_view)
        self.members = nn.ModuleList(_Detector(d) for d in scorer.detectors if d.name in members)
        if not self.members:
            raise GateCopyError("the gate has no fused detectors")
        self.threshold = float(scorer.threshold)
        self.needs = frozenset(d.view for d in self.members)

    def forward(self, x: torch.Tensor, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        views = {"input": self.input_view(x) if "input" in self.needs else None, "logits": logits, "features": features}
        z = []
        for d in self.members:
            v = views[d.view]
            if v is None:
                raise GateCopyError(f"detector '{d.name}' needs the {d.view!r} view")
            z.append((d(v.reshape(len(v), -1).double()) - d.mean) / d.std)
        zz = torch.stack(z, dim=1)
        if self.rule == "mean_pos_z":  # one-sided: a detector only adds evidence
            return zz.clamp(min=0.0).mean(dim=1)
        if self.rule == "max_z":
            return zz.amax(dim=1)
        return zz.mean(dim=1)


class GuardedTorch(nn.Module):
    """``x -> (logits, fused gate score)`` from a ``(logits, features)`` torch model and the gate copy."""

    def __init__(self, model: nn.Module, gate: TorchGate) -> None:
        super().__init__()
        self.model = model.eval()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x)
        logits, feats = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        return logits, self.gate(x, logits, feats)


@dataclass(frozen=True)
class CopyCheck:
    n: int
    max_abs_error: float
    decisions_agree: float  # share of inputs where copy and runtime agree on accept/reject
    ok: bool


def check_copy(guarded: GuardedTorch, scorer: AnomalyScorer, x: np.ndarray, logits: np.ndarray,
               features: np.ndarray | None, tol: float = 1e-3) -> CopyCheck:
    """Compare the copy's fused score on ``x`` with the runtime scorer's on the deployed outputs."""
    with torch.no_grad():
        ours = guarded(torch.from_numpy(np.ascontiguousarray(x, np.float32)))[1].numpy()
    ref = scorer.score(x, logits, features)
    err = float(np.abs(ours - ref).max()) if len(x) else 0.0
    agree = float(np.mean((ours > scorer.threshold) == (ref > scorer.threshold))) if len(x) else 1.0
    return CopyCheck(len(x), err, agree, err <= tol * (1.0 + float(np.abs(ref).max(initial=0.0))))
