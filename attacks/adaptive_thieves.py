"""Thieves that choose their next queries from the answers so far, in rounds.

* ``active_uncertainty``: pool-based active learning with uncertainty sampling. A quarter
  of the budget goes on random pool points; each later round queries the unqueried pool
  points on which the current student's top-2 margin is smallest, then retrains.
* ``jbda``: Jacobian-based dataset augmentation (Papernot et al., "Practical Black-Box
  Attacks against Machine Learning", AsiaCCS 2017): start from 30 real seeds; each round
  adds ``x + lambda * sign(d F_y(x) / dx)`` for every point so far, with the gradient taken
  on the *substitute* (the student being trained) for the class the victim assigned to x
  (the substitute's own prediction where the victim refused to answer), with Papernot's
  periodic step size ``lambda_r = lambda * (-1) ** (r // flip_every)``. Without the flip
  (``flip_every=0``) the steps only climb the assigned class, the victim mostly agrees
  with the substitute there, the loss is ~0 and the student stops learning after its
  seeds (measured on the digits demo: identical predictions from 31 to 200 queries).

* ``dfme``: data-free model extraction (Truong et al., "Data-Free Model Extraction", CVPR
  2021): no real data at all. A generator G(z) is trained to *maximise* the L1 disagreement
  between the student's and the victim's centred log-probabilities; the victim is a black
  box, so the generator's gradient through it is a zeroth-order forward-difference estimate
  along ``directions`` random unit directions (each costs a query per sample). The student
  then minimises the same disagreement on fresh generated queries. The victim's output is
  only what its output policy returns (a one-hot for label-only, rounded or top-k scores),
  turned into log-probabilities with a floor. Answered queries are kept in a replay memory
  the student revisits for free (no extra queries).

Gate-aware filtering (attack names ending in ``+gate``): the thief keeps only what the gate
answered and steers away from what it refused; every refused query still counts against the
budget. Active learning queries pool points whose nearest queried neighbour was refused only
after all others; JBDA augments only answered points; DFME scores a refused
query as ``-reject_penalty`` in the generator's objective (the generator learns to stay
where the gate answers) instead of dropping it.

All train the same ART ``PyTorchClassifier`` thief as ``attacks.extraction.steal``
(answered queries only, hard labels for the first two, step budget per round) and return
its ``StolenModel``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacks.errors import InputError
from attacks.extraction import StolenModel, ThiefSpec, make_thief
from attacks.thief_data import N_SEEDS
from attacks.victims import Victim

BASE_ADAPTIVE = ("active_uncertainty", "jbda", "dfme")
GATE_AWARE_SUFFIX = "+gate"
ADAPTIVE_ATTACKS = (*BASE_ADAPTIVE, *(a + GATE_AWARE_SUFFIX for a in BASE_ADAPTIVE))


def parse_adaptive(attack: str) -> tuple[str, bool]:
    """``"jbda+gate"`` -> ``("jbda", True)``; unknown names are an InputError."""
    if attack not in ADAPTIVE_ATTACKS:
        raise InputError(f"unknown adaptive attack {attack!r}; choose from {', '.join(ADAPTIVE_ATTACKS)}")
    base = attack.removesuffix(GATE_AWARE_SUFFIX)
    return base, base != attack


def _ask(victim: Victim, x: np.ndarray) -> np.ndarray:
    """Hard labels as one-hot rows; rows the victim did not answer stay zero (the thief drops them)."""
    out = victim.query(x)
    answered = out.sum(1) > 0
    y = np.zeros_like(out)
    y[answered, out[answered].argmax(1)] = 1.0
    return y


def _fit(thief, x: np.ndarray, y: np.ndarray, spec: ThiefSpec) -> None:
    thief.fit(x, y, batch_size=spec.batch_size, nb_epochs=spec.max_epochs)


def _refused_nearby(pool: np.ndarray, queried: np.ndarray, answered: np.ndarray) -> np.ndarray:
    """Mask of ``pool`` rows whose nearest queried row (L2, flattened) was refused: the thief's
    own estimate of where the gate says no."""
    if answered.all():
        return np.zeros(len(pool), bool)
    p = pool.reshape(len(pool), -1).astype(np.float32)
    q = queried.reshape(len(queried), -1).astype(np.float32)
    out = np.empty(len(p), bool)
    qq = (q * q).sum(1)
    for i in range(0, len(p), 1024):
        d = qq[None, :] - 2.0 * p[i:i + 1024] @ q.T
        out[i:i + 1024] = ~answered[d.argmin(1)]
    return out


def steal_adaptive(
    victim: Victim,
    pool: np.ndarray,
    attack: str,
    spec: ThiefSpec,
    budget: int,
    *,
    rounds: int = 4,
    lam: float = 0.1,
    flip_every: int = 1,
    seed: int = 0,
    dfme: "DfmeSettings | None" = None,
) -> StolenModel:
    """Spend exactly ``budget`` queries on ``victim`` (fresh attacker assumed) with an adaptive thief whose
    real data is ``pool`` (active learning picks from it; JBDA takes its first 30 rows as seeds; DFME
    ignores it). ``attack`` may end in ``+gate`` (gate-aware filtering, see the module doc)."""
    base, gate_aware = parse_adaptive(attack)
    if budget < 1 or rounds < 1:
        raise InputError(f"budget and rounds must be positive, got {budget}, {rounds}")
    pool = np.asarray(pool, np.float32)
    rng = np.random.default_rng(seed)
    thief = make_thief(spec, victim, seed)
    lo, hi = victim.clip_values
    t0 = time.perf_counter()
    sent_before = victim.ledger.sent
    if base == "dfme":
        _dfme(victim, thief, spec, budget, gate_aware, dfme or DfmeSettings(), seed)
    elif base == "active_uncertainty":
        if len(pool) < budget:
            raise InputError(f"active learning needs a pool of at least the budget ({len(pool)} < {budget})")
        per_round = [budget // rounds + (1 if i < budget % rounds else 0) for i in range(rounds)]
        left = rng.permutation(len(pool))
        xs, ys = pool[left[: per_round[0]]], _ask(victim, pool[left[: per_round[0]]])
        left = left[per_round[0]:]
        _fit(thief, xs, ys, spec)
        for k in per_round[1:]:
            if k == 0:
                continue
            p = np.asarray(thief.predict(pool[left], batch_size=512))
            top2 = np.sort(p, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            if gate_aware:  # refused-looking points go last, whatever their margin
                margin = margin + 2.0 * _refused_nearby(pool[left], xs, ys.sum(1) > 0)
            pick = np.argsort(margin, kind="stable")[:k]  # smallest margin first
            chosen = left[pick]
            left = np.delete(left, pick)
            xs = np.concatenate([xs, pool[chosen]])
            ys = np.concatenate([ys, _ask(victim, pool[chosen])])
            _fit(thief, xs, ys, spec)
    else:
        n0 = min(N_SEEDS, len(pool), budget)
        xs = pool[rng.choice(len(pool), n0, replace=False)]
        ys = _ask(victim, xs)
        _fit(thief, xs, ys, spec)
        step = lam * (hi - lo)
        r = 0
        while len(xs) < budget:
            answered = ys.sum(1) > 0
            # gate-aware: expand only what the gate answered (all points if it answered none yet)
            cand = np.flatnonzero(answered) if gate_aware and answered.any() else np.arange(len(xs))
            k = min(len(cand), budget - len(xs))
            sel = cand if k == len(cand) else rng.choice(cand, k, replace=False)
            src = xs[sel]
            ans = answered[sel]  # the victim's label where it answered, else the substitute's
            lab = np.where(ans, ys[sel].argmax(1), np.asarray(thief.predict(src, batch_size=512)).argmax(1))
            grad = np.asarray(thief.class_gradient(src, label=lab)).reshape(src.shape)
            sign = -1.0 if flip_every and (r // flip_every) % 2 else 1.0
            new = np.clip(src + sign * step * np.sign(grad), lo, hi).astype(np.float32)
            r += 1
            xs = np.concatenate([xs, new])
            ys = np.concatenate([ys, _ask(victim, new)])
            _fit(thief, xs, ys, spec)
    return StolenModel(
        attack=attack,
        budget=int(budget),
        thief=thief,
        queries_sent=victim.ledger.sent - sent_before,
        answered=victim.ledger.answered,
        trained_on=thief.n_trained,
        labels_seen=len(victim.labels_seen),
        seconds=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- DFME


@dataclass(frozen=True)
class DfmeSettings:
    """DFME's knobs (Truong et al. 2021 use batch 256, m=1 direction, eps 1e-3, 5 student steps per
    generator step and budgets of millions; these defaults are for budgets of thousands)."""

    batch: int = 32
    directions: int = 1  # m: random directions per sample for the forward-difference estimate
    fd_eps: float = 1e-3  # forward-difference step, in units of the value range
    student_steps: int = 5  # student updates (each a fresh generated batch) per generator update
    replay_steps: int = 2  # extra student updates on the replay memory per round (free: no queries)
    latent: int = 32
    lr_generator: float = 5e-4
    lr_student: float = 1e-3
    floor: float = 1e-4  # probability floor when turning answers into log-probabilities
    reject_penalty: float = 1.0  # gate-aware: objective of a refused query is -penalty

    def queries_per_round(self) -> int:
        return self.batch * (self.directions + 1) + self.batch * self.student_steps


class _Generator(torch.nn.Module):
    """z -> an input in [lo, hi]: a DCGAN-style upsampler for CxHxW images, an MLP for flat inputs."""

    def __init__(self, shape: tuple[int, ...], latent: int, lo: float, hi: float) -> None:
        super().__init__()
        from torch import nn

        self.shape, self.lo, self.hi = tuple(shape), lo, hi
        if len(shape) == 3:
            c, h, w = shape
            self.h0, self.w0 = max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4))
            self.fc = nn.Linear(latent, 64 * self.h0 * self.w0)
            self.net = nn.Sequential(
                nn.BatchNorm2d(64), nn.Upsample(scale_factor=2), nn.Conv2d(64, 64, 3, padding=1),
                nn.BatchNorm2d(64), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2), nn.Conv2d(64, 32, 3, padding=1),
                nn.BatchNorm2d(32), nn.LeakyReLU(0.2), nn.Conv2d(32, c, 3, padding=1), nn.BatchNorm2d(c, affine=False))
        else:
            d = int(np.prod(shape))
            self.fc = nn.Linear(latent, 128)
            self.net = nn.Sequential(nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2), nn.Linear(128, d))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z)
        if len(self.shape) == 3:
            h = self.net(h.view(len(z), 64, self.h0, self.w0))
            h = torch.nn.functional.interpolate(h, size=self.shape[1:], mode="bilinear", align_corners=False) \
                if h.shape[2:] != self.shape[1:] else h
        else:
            h = self.net(h).view(len(z), *self.shape)
        return self.lo + (self.hi - self.lo) * (torch.tanh(h) + 1) / 2


def _centred_log(p: np.ndarray | torch.Tensor, floor: float):
    """Log-probabilities with a floor, centred per row (DFME's logit recovery from probabilities)."""
    if isinstance(p, torch.Tensor):
        lp = torch.log(torch.clamp(p, min=floor))
        return lp - lp.mean(1, keepdim=True)
    lp = np.log(np.maximum(p, floor))
    return lp - lp.mean(1, keepdims=True)


def _victim_probs(out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Answered mask and the answers renormalised to sum to 1 (top-k / rounded vectors need not)."""
    s = out.sum(1)
    answered = s > 0
    p = np.where(answered[:, None], out / np.where(answered, s, 1.0)[:, None], 0.0)
    return answered, p.astype(np.float32)


def _dfme(victim: Victim, thief: Any, spec: ThiefSpec, budget: int, gate_aware: bool, cfg: DfmeSettings,
          seed: int) -> None:
    """Train ``thief`` (ART PyTorchClassifier, in place) by DFME with exactly ``budget`` queries."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lo, hi = victim.clip_values
    shape = victim.sample_shape
    dim = int(np.prod(shape))
    gen = _Generator(shape, cfg.latent, lo, hi)
    student = thief.model
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr_generator)
    opt_s = torch.optim.Adam(student.parameters(), lr=cfg.lr_student)
    mem_x: list[np.ndarray] = []
    mem_p: list[np.ndarray] = []
    left = budget
    eps = cfg.fd_eps * (hi - lo)

    def student_logp(x: torch.Tensor) -> torch.Tensor:
        return _centred_log(torch.softmax(student(x), 1), cfg.floor)

    def student_step(x: np.ndarray, p: np.ndarray) -> None:
        student.train()
        loss = (student_logp(torch.from_numpy(x)) - torch.from_numpy(_centred_log(p, cfg.floor))).abs().sum(1).mean()
        opt_s.zero_grad()
        loss.backward()
        opt_s.step()

    while left > 0:
        # generator step: zeroth-order estimate of d disagreement / dx through the victim
        b = min(cfg.batch, left // (cfg.directions + 1))
        if b >= 2 and left >= cfg.queries_per_round() // 2:  # BatchNorm needs 2+ samples in training
            gen.train()
            x = gen(torch.randn(b, cfg.latent))
            xn = x.detach().numpy().reshape(b, dim)
            u = rng.normal(size=(b, cfg.directions, dim)).astype(np.float32)
            u /= np.linalg.norm(u, axis=2, keepdims=True)
            pts = np.concatenate([xn[:, None], np.clip(xn[:, None] + eps * u, lo, hi)], 1)
            out = victim.query(pts.reshape(-1, *shape))
            left -= len(pts.reshape(-1, dim))
            answered, p = _victim_probs(out)
            student.eval()
            with torch.no_grad():
                s_lp = student_logp(torch.from_numpy(pts.reshape(-1, *shape))).numpy()
            f = np.abs(s_lp - _centred_log(p, cfg.floor)).sum(1)
            if gate_aware:
                f = np.where(answered, f, -cfg.reject_penalty)
            f = f.reshape(b, cfg.directions + 1)
            ok = answered.reshape(b, cfg.directions + 1)
            usable = ok.all(1) | gate_aware  # without gate-awareness a refused pair carries no estimate
            diff = np.where(usable[:, None], (f[:, 1:] - f[:, :1]) / eps, 0.0)
            grad = (dim / cfg.directions) * (diff[:, :, None] * u).sum(1)
            opt_g.zero_grad()
            (-(x.view(b, dim) * torch.from_numpy(grad.astype(np.float32))).sum() / b).backward()
            opt_g.step()
            keep = answered.reshape(b, -1)[:, 0]
            mem_x.append(pts[:, 0][keep].reshape(-1, *shape))
            mem_p.append(p.reshape(b, cfg.directions + 1, -1)[:, 0][keep])
        # student steps on fresh generated queries
        for _ in range(cfg.student_steps):
            b = min(cfg.batch, left)
            if b < 1:
                break
            gen.eval()
            with torch.no_grad():
                xs = gen(torch.randn(b, cfg.latent)).numpy().astype(np.float32)
            answered, p = _victim_probs(victim.query(xs))
            left -= b
            if answered.any():
                mem_x.append(xs[answered])
                mem_p.append(p[answered])
                if answered.sum() >= 2:
                    student_step(xs[answered], p[answered])
        if mem_x:
            mx, mp = np.concatenate(mem_x), np.concatenate(mem_p)
            for _ in range(cfg.replay_steps if len(mx) >= 2 else 0):
                idx = rng.choice(len(mx), min(len(mx), spec.batch_size), replace=False)
                student_step(mx[idx], mp[idx])
    n = sum(len(m) for m in mem_x)
    thief.n_trained = max(thief.n_trained, n)
    student.eval()
