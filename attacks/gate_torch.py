"""A differentiable torch copy of the runtime anomaly gate, for attackers who know it.

``TorchGate`` reads what ships (``AnomalyScorer.npz_bytes`` and ``AnomalyScorer.meta``,
the exported ``detectors.npz``/``detectors.json``) and recomputes every fused
detector and the fusion rule with torch ops, so an adaptive attack can follow the
gradient of the fused score. It is a *copy*: ``check_copy`` compares it with the
runtime scorer on real inputs, and tests do the same, so a change to the runtime's
detectors or fusion breaks loudly instead of letting the copy drift. A fusion rule or
detector kind the copy does not know raises ``GateCopyError``; the audit then says the
adaptive white-box attack could not run (it does not fall back silently).

The minimum in Mahalanobis / k-th neighbour distances is kept exact (its gradient
flows through the arg-min), so forward values equal the runtime's.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runtime_guard.anomaly import AnomalyScorer

FUSION_RULES = ("mean_z", "mean_pos_z", "max_z")  # runtime_guard.anomaly.fuse_z


class GateCopyError(Exception):
    """The exported gate uses a detector kind or fusion rule this copy cannot reproduce."""


def _arrays(scorer: AnomalyScorer) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(scorer.npz_bytes), allow_pickle=False) as z:
        return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


class _Detector(nn.Module):
    def __init__(self, spec: dict, arrays: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.name, self.kind, self.view = str(spec["name"]), str(spec["kind"]), str(spec["view"])
        self.mean, self.std = float(spec["norm"]["mean"]), float(spec["norm"]["std"])
        p = spec.get("params") or {}
        self.temperature = float(p.get("temperature", 1.0))
        self.k = int(p.get("n_neighbors", 1))
        self.normalize = bool(p.get("normalize", self.kind == "knn"))
        a = {k.split("__", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{self.name}__")}
        if self.kind == "mahalanobis":
            means, precision = _t(a["means"]), _t(a["precision"])
            self.register_buffer("precision", precision)
            self.register_buffer("means_p", means @ precision)  # (C, D): mu_c P
            self.register_buffer("mu_p_mu", (means @ precision * means).sum(1))  # (C,)
        elif self.kind in ("knn", "input_knn"):
            self.register_buffer("bank", _t(a["bank"]))
        elif self.kind == "pca":
            self.register_buffer("pmean", _t(a["mean"]))
            self.register_buffer("components", _t(a["components"]))
        elif self.kind not in ("msp", "energy"):
            raise GateCopyError(f"detector '{self.name}': kind {self.kind!r} has no torch copy")

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if self.kind == "energy":
            return -t * torch.logsumexp(v / t, dim=1)
        if self.kind == "msp":
            return 1.0 - torch.softmax(v / t, dim=1).max(dim=1).values
        if self.kind == "mahalanobis":
            # (v - mu)^T P (v - mu) as matrix products, as runtime_guard.anomaly.Mahalanobis does
            vpv = ((v @ self.precision) * v).sum(1, keepdim=True)
            return (vpv - 2.0 * (v @ self.means_p.T) + self.mu_p_mu[None, :]).min(dim=1).values
        if self.kind in ("knn", "input_knn"):
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
        meta = scorer.meta
        fusion = meta.get("fusion") or {}
        self.rule = fusion.get("rule")
        if self.rule not in FUSION_RULES:
            raise GateCopyError(f"fusion rule {self.rule!r} has no torch copy (known: {', '.join(FUSION_RULES)})")
        members = set(fusion.get("members") or [])
        arrays = _arrays(scorer)
        self.members = nn.ModuleList(_Detector(s, arrays) for s in meta.get("detectors") or [] if s["name"] in members)
        if not self.members:
            raise GateCopyError("the gate has no fused detectors")
        self.threshold = float(scorer.threshold)
        self.needs = frozenset(d.view for d in self.members)

    def forward(self, x: torch.Tensor, logits: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        views = {"input": x.reshape(len(x), -1), "logits": logits, "features": features}
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
    ref = scorer.score(x.reshape(len(x), -1), logits, features)
    err = float(np.abs(ours - ref).max()) if len(x) else 0.0
    agree = float(np.mean((ours > scorer.threshold) == (ref > scorer.threshold))) if len(x) else 1.0
    return CopyCheck(len(x), err, agree, err <= tol * (1.0 + float(np.abs(ref).max(initial=0.0))))
