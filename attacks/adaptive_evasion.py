"""Evasion attacks that know the anomaly gate: success = misclassified **and accepted**.

Three attackers, each judged on the deployed model and the runtime gate through
``judge(x) -> (logits, accepted)`` (never on a torch copy):

* ``white-box``: PGD on the classification loss plus a penalty on the differentiable
  gate copy (``attacks.gate_torch``), one run per penalty weight (weight 0 is plain PGD),
  plus a constraint run that steps down the gate score whenever the copy says the point
  would be rejected and up the loss otherwise (orthogonal-PGD style, Bryniarski et al.
  2022). Every iterate of every run is judged; any accepted misclassification counts.
* ``score``: random-search Square attack (Andriushchenko et al. 2020, L-inf) on the
  returned scores where a rejected query scores +inf, so it only moves to accepted inputs.
* ``decision``: ART's HopSkipJump on labels only where a rejection reads as the true
  label (a failure), started from accepted natural inputs of other classes; counted
  where its L-inf distance is within eps.

``run_adaptive`` also runs the same attacks against the bare model (everything accepted)
and plain PGD followed by the gate (the non-adaptive figure), so the three figures sit
side by side.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from attacks.gate_torch import GuardedTorch

Judge = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # x -> (logits (n, C), accepted (n,) bool)

PROFILES: dict[str, dict] = {
    "quick": {"steps": 20, "weights": (0.0, 0.3, 1.0, 3.0, 10.0), "square_iter": 150, "hsj_iter": 3,
              "hsj_eval": 60, "hsj_init_eval": 10},
    "thorough": {"steps": 100, "weights": (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), "square_iter": 1000,
                 "hsj_iter": 20, "hsj_eval": 500, "hsj_init_eval": 50},
}
GATE_MARGIN = 0.05  # aim this far (fused z units) below the threshold so float noise does not flip it
ATTACKERS = ("white-box", "score", "decision")


@dataclass
class EpsResult:
    eps: float
    guarded_robust_accuracy: float  # no attack found an accepted misclassification
    bare_robust_accuracy: float  # same attacks, no gate
    non_adaptive_guarded_accuracy: float | None  # plain PGD (final iterate), then the gate; None without gradients
    found_by: dict[str, int]  # accepted misclassifications per attacker (guarded)
    found_adaptive: int
    found_plain_pgd_then_gate: int | None
    found_bare: int
    best_weight_hits: dict[str, int] = field(default_factory=dict)  # white-box hits per penalty weight/constraint

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptiveResult:
    n: int
    clean_accuracy: float
    clean_accepted: float  # share of clean points the gate accepts
    clean_accepted_correct: float
    threshold: float
    eps: list[EpsResult]
    adversarial_examples: dict[float, np.ndarray] = field(default_factory=dict, repr=False)  # accepted, misclassified

    def to_dict(self) -> dict:
        return {"n": self.n, "clean_accuracy": self.clean_accuracy, "clean_accepted": self.clean_accepted,
                "clean_accepted_correct": self.clean_accepted_correct, "threshold": self.threshold,
                "eps": [e.to_dict() for e in self.eps]}


def _success(judge: Judge, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits, accepted = judge(x)
    return (logits.argmax(1) != y) & accepted


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, clip: tuple[float, float]) -> torch.Tensor:
    return torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), clip[0], clip[1])


def pgd_gate(guarded: GuardedTorch, judge: Judge, x: np.ndarray, y: np.ndarray, eps: float,
             clip: tuple[float, float], weight: float | None, steps: int, seed: int = 0,
             use_gate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One PGD run. ``weight``: gate penalty weight (0 = plain PGD); None = constraint mode.

    Returns (hit mask over all iterates, an accepted misclassified example per hit row
    (else the final iterate), the final iterate). ``use_gate=False`` judges with the
    gate's verdict ignored (bare model).
    """
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    thr = guarded.gate.threshold - GATE_MARGIN
    x_adv = _project(xt + (torch.rand(xt.shape, generator=g) * 2 - 1) * eps, xt, eps, clip)
    step = 2.5 * eps / steps
    hit = np.zeros(len(x), bool)
    best = x.astype(np.float32).copy()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits, score = guarded(x_adv)
        ce = nn.functional.cross_entropy(logits, yt, reduction="none")
        if weight is None:  # constraint: fix the gate first, then the loss
            rejected = (score > thr).detach()
            obj = torch.where(rejected, -score.float(), ce)
        elif weight > 0:
            obj = ce - weight * torch.relu(score - thr).float()
        else:
            obj = ce
        (grad,) = torch.autograd.grad(obj.sum(), x_adv)
        with torch.no_grad():
            x_adv = _project(x_adv + step * grad.sign(), xt, eps, clip)
        cand = x_adv.detach().numpy()
        ok = _success(judge, cand, y) if use_gate else (judge(cand)[0].argmax(1) != y)
        new = ok & ~hit
        best[new] = cand[new]
        hit |= ok
    final = x_adv.detach().numpy()
    best[~hit] = final[~hit]
    return hit, best, final


def square_gate(judge: Judge, x: np.ndarray, y: np.ndarray, eps: float, clip: tuple[float, float],
                iters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """L-inf Square attack on the margin loss; rejected queries score +inf (never moved to)."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float32)
    shape = x.shape
    img = x.reshape(len(x), -1, *(shape[2:] if x.ndim == 4 else (1, int(np.prod(shape[1:])))))
    c, h, w = img.shape[1:]

    def loss(xa: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, acc = judge(xa.reshape((len(xa), *shape[1:])))
        zy = logits[np.arange(len(xa)), yy]
        other = np.where(np.eye(logits.shape[1], dtype=bool)[yy], -np.inf, logits).max(1)
        margin = zy - other
        return np.where(acc, margin, np.inf), (margin < 0) & acc

    stripes = eps * rng.choice([-1.0, 1.0], size=(len(x), c, 1, w)).astype(np.float32)
    x_adv = np.clip(img + stripes, *clip)
    cur, hit = loss(x_adv, y)
    start_bad = ~np.isfinite(cur)  # the stripe start is rejected: start from the clean point
    if start_bad.any():
        x_adv[start_bad] = img[start_bad]
        cur[start_bad], hit[start_bad] = loss(img[start_bad], y[start_bad])
    for i in range(iters):
        act = np.flatnonzero(~hit)
        if len(act) == 0:
            break
        p = 0.8 * 0.5 ** int(4 * i / iters)  # square area shrinks 0.8 -> 0.1 of the image
        s = int(max(1, min(h, w, round(np.sqrt(p * h * w)))))
        cand = x_adv[act].copy()
        for j, k in enumerate(act):
            r, q = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            cand[j, :, r:r + s, q:q + s] = img[k, :, r:r + s, q:q + s] + eps * rng.choice([-1.0, 1.0], size=(c, 1, 1))
        cand = np.clip(np.clip(cand, img[act] - eps, img[act] + eps), *clip)
        new, ok = loss(cand, y[act])
        better = new < cur[act]
        x_adv[act[better]] = cand[better]
        cur[act[better]] = new[better]
        hit[act[better & ok]] = True
    return hit, x_adv.reshape(shape)


def hsj_gate(judge: Judge, x: np.ndarray, y: np.ndarray, eps: float, clip: tuple[float, float],
             pool: np.ndarray, settings: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """HopSkipJump (ART, L-inf, labels only) per point; a rejection reads as the true label."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    logging.getLogger("art").setLevel(logging.ERROR)
    nb = int(judge(x[:1])[0].shape[1])
    pool_logits, pool_acc = judge(pool)
    pool_lab = pool_logits.argmax(1)
    hit = np.zeros(len(x), bool)
    out = x.astype(np.float32).copy()
    np.random.seed(seed)
    for i in range(len(x)):
        yi = int(y[i])

        def predict(z: np.ndarray, yi: int = yi) -> np.ndarray:
            logits, acc = judge(z.astype(np.float32))
            lab = np.where(acc, logits.argmax(1), yi)
            return np.eye(nb, dtype=np.float32)[lab]

        starts = np.flatnonzero(pool_acc & (pool_lab != yi))
        if len(starts) == 0:
            continue
        d = np.abs(pool[starts].reshape(len(starts), -1) - x[i].reshape(1, -1)).max(1)
        init = pool[starts[np.argmin(d)]][None].astype(np.float32)
        clf = BlackBoxClassifier(predict, x.shape[1:], nb, clip_values=clip)
        atk = HopSkipJump(clf, targeted=False, norm=np.inf, max_iter=int(settings["hsj_iter"]),
                          max_eval=int(settings["hsj_eval"]), init_eval=int(settings["hsj_init_eval"]),
                          init_size=10, batch_size=64, verbose=False)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            adv = atk.generate(x[i:i + 1].astype(np.float32), y=np.eye(nb, dtype=np.float32)[[yi]], x_adv_init=init)
        if np.abs(adv - x[i:i + 1]).max() <= eps + 1e-6 and bool(_success(judge, adv, y[i:i + 1])[0]):
            hit[i], out[i] = True, adv[0]
    return hit, out


def run_adaptive(guarded: GuardedTorch | None, judge: Judge, x: np.ndarray, y: np.ndarray, eps_grid: list[float],
                 clip: tuple[float, float], pool: np.ndarray, profile: str = "quick", seed: int = 0,
                 attackers: tuple[str, ...] = ATTACKERS, threshold: float = float("nan"),
                 progress: Callable[[str], None] | None = None) -> AdaptiveResult:
    """Guarded vs bare vs non-adaptive robust accuracy per eps (see the module docstring).

    ``guarded`` None (no torch copy reproduces model and gate): the gradient attacks,
    and with them the non-adaptive PGD figure, are not run.
    """
    s = PROFILES[profile]
    if guarded is None:
        attackers = tuple(a for a in attackers if a != "white-box")
    say = progress or (lambda _m: None)
    logits, accepted = judge(x)
    correct = logits.argmax(1) == y
    clean_hit = ~correct & accepted  # already an accepted misclassification at eps 0

    def bare(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lg, _ = judge(z)
        return lg, np.ones(len(z), bool)

    results, examples = [], {}
    n = len(x)
    for eps in eps_grid:
        found = clean_hit.copy()
        adv = x.astype(np.float32).copy()
        by: dict[str, int] = {}
        per_w: dict[str, int] = {}
        say(f"eps {eps:g}: white-box PGD through the gate copy")
        plain_hit_final = None
        if "white-box" in attackers and guarded is not None:
            wb = np.zeros(n, bool)
            for w in (*s["weights"], None):
                hit, best, final = pgd_gate(guarded, judge, x, y, eps, clip, w, s["steps"], seed)
                if w == 0.0:
                    plain_hit_final = _success(judge, final, y)
                per_w["constraint" if w is None else f"w={w:g}"] = int(hit.sum())
                adv[hit & ~found] = best[hit & ~found]
                wb |= hit
                found |= hit
            by["white-box"] = int(wb.sum())
        if "score" in attackers:
            say(f"eps {eps:g}: score-based Square, rejected = +inf")
            hit, cand = square_gate(judge, x, y, eps, clip, s["square_iter"], seed)
            adv[hit & ~found] = cand[hit & ~found]
            by["score"] = int(hit.sum())
            found |= hit
        if "decision" in attackers:
            say(f"eps {eps:g}: decision-based HopSkipJump, rejected = failure")
            todo = np.flatnonzero(~found)
            hit = np.zeros(n, bool)
            if len(todo):
                h, cand = hsj_gate(judge, x[todo], y[todo], eps, clip, pool, s, seed)
                hit[todo[h]] = True
                adv[todo[h]] = cand[h]
            by["decision"] = int(hit.sum())
            found |= hit
        if plain_hit_final is None and guarded is not None:
            _, _, final = pgd_gate(guarded, judge, x, y, eps, clip, 0.0, s["steps"], seed)
            plain_hit_final = _success(judge, final, y)
        plain = None if plain_hit_final is None else plain_hit_final | clean_hit
        say(f"eps {eps:g}: the same attacks on the bare model")
        bare_found = ~correct
        if guarded is not None:
            h, _, _ = pgd_gate(guarded, bare, x, y, eps, clip, 0.0, s["steps"], seed, use_gate=False)
            bare_found = bare_found | h
        if "score" in attackers:
            h, _ = square_gate(bare, x, y, eps, clip, s["square_iter"], seed)
            bare_found = bare_found | h
        # the gate can only remove successes, so anything found through it also breaks the bare model
        bare_found = bare_found | found
        results.append(EpsResult(
            eps=float(eps),
            guarded_robust_accuracy=float(1 - found.mean()),
            bare_robust_accuracy=float(1 - bare_found.mean()),
            non_adaptive_guarded_accuracy=None if plain is None else float(1 - plain.mean()),
            found_by=by, found_adaptive=int(found.sum()),
            found_plain_pgd_then_gate=None if plain is None else int(plain.sum()),
            found_bare=int(bare_found.sum()), best_weight_hits=per_w,
        ))
        examples[float(eps)] = adv[found & ~clean_hit]
    return AdaptiveResult(n=n, clean_accuracy=float(correct.mean()), clean_accepted=float(accepted.mean()),
                          clean_accepted_correct=float((correct & accepted).mean()),
                          threshold=threshold, eps=results, adversarial_examples=examples)
