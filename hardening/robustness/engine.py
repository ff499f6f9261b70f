"""Worst-case attack ensemble (AutoAttack-style, our own engine).

Attacks run from cheap to expensive, each only on the points the **deployed
artifact** (its onnxruntime session) still classifies correctly; a point is robust
only if every attack failed. Epsilons run in increasing order and a point broken at
a small epsilon stays broken at larger ones (the same perturbation is still inside
the ball), so each larger epsilon only attacks the survivors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attacks.estimators import OrtLogits, QueryCounter
from attacks.evasion import ATTACKS, SkipAttack, craft
from hardening.robustness.results import AttackRun, EpsResult
from hardening.robustness.stats import perturbation_norms, project, wilson_interval

Progress = Callable[[str, int, int], None]
GRADIENT_FAMILIES = ("white-box", "bpda", "transfer")


@dataclass
class Stage:
    family: str
    attack: str
    estimator: Any


@dataclass
class Target:
    """The deployed model and the estimators through which it is attacked."""

    ort_fn: OrtLogits
    surrogate_counter: QueryCounter
    stages: list[Stage]
    clip_values: tuple[float, float]

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(s.family for s in self.stages))


@dataclass
class CascadeOutcome:
    eps: list[EpsResult]
    runs: list[AttackRun]
    clean_pred: np.ndarray
    correct: np.ndarray
    broken_eps: np.ndarray  # nan where never broken
    broken_by: list[str | None]
    break_norm: np.ndarray
    min_dist: np.ndarray  # inf where no adversarial found
    queries: np.ndarray
    surrogate_queries: np.ndarray
    x_adv: np.ndarray  # the adversarial that first broke each point (the clean input if none did)

    @property
    def robust(self) -> np.ndarray:
        return self.correct & np.isnan(self.broken_eps)


def run_cascade(
    target: Target,
    x: np.ndarray,
    y: np.ndarray,
    eps_grid: list[float],
    norm: float,
    settings: dict[str, dict],
    seed: int = 0,
    progress: Progress | None = None,
    label: str = "",
) -> CascadeOutcome:
    lo, hi = target.clip_values
    n = len(x)
    ort = target.ort_fn
    for c in (ort.counter, target.surrogate_counter):
        c.set_reference(x)
    clean_pred = ort.labels(x)
    correct = clean_pred == y
    alive = correct.copy()
    broken_eps = np.full(n, np.nan)
    broken_by: list[str | None] = [None] * n
    break_norm = np.full(n, np.nan)
    min_dist = np.full(n, np.inf)
    min_dist[~correct] = 0.0
    x_adv = x.copy()
    cache: dict[str, dict[int, tuple[float, np.ndarray]]] = {}
    runs: list[AttackRun] = []
    results: list[EpsResult] = []
    grid = sorted(eps_grid)
    total = len(grid) * len(target.stages)
    done = 0
    for ei, eps in enumerate(grid):
        after: dict[str, float] = {}
        first: dict[str, int] = {}
        for si, st in enumerate(target.stages):
            spec = ATTACKS[st.attack]
            idx = np.flatnonzero(alive)
            if progress:
                progress(f"{label} eps={eps:g} {st.family}/{st.attack}", done, total)
            t0, q0, s0 = time.perf_counter(), ort.counter.total, target.surrogate_counter.total
            skipped = None
            hit = np.zeros(len(idx), dtype=bool)
            dist = np.zeros(len(idx))
            sentinel = _sentinel(st, target.stages, idx, settings, seed + 1000 * ei + si)
            if len(idx):
                try:
                    hit, dist, cand = _attack(
                        st, spec, x, y, sentinel if sentinel is not None else idx, eps, norm, settings,
                        seed + 1000 * ei + si, lo, hi, ort, cache
                    )
                    if sentinel is not None:
                        hit, dist, cand, idx = _widen(hit, dist, cand, sentinel, st, spec, x, y, idx, eps, norm,
                                                      settings, seed + 1000 * ei + si, lo, hi, ort, cache)
                except SkipAttack as e:
                    skipped = str(e)
            for j, i in enumerate(idx[hit]):
                x_adv[i] = cand[hit][j]
                alive[i] = False
                broken_eps[i] = eps
                broken_by[i] = st.attack
                break_norm[i] = dist[hit][j]
            if hit.any():
                first[st.attack] = first.get(st.attack, 0) + int(hit.sum())
            runs.append(
                AttackRun(
                    attack=st.attack,
                    family=st.family,
                    eps=eps,
                    attacked=len(idx),
                    broken=int(hit.sum()),
                    queries=ort.counter.total - q0,
                    surrogate_queries=target.surrogate_counter.total - s0,
                    seconds=round(time.perf_counter() - t0, 4),
                    skipped=skipped,
                )
            )
            done += 1
            last_of_family = si + 1 == len(target.stages) or target.stages[si + 1].family != st.family
            if last_of_family:
                after[st.family] = float(alive.sum()) / n
        for d in cache.values():  # eps-free attacks also bound the minimal distance
            for i, (v, _) in d.items():
                min_dist[i] = min(min_dist[i], v)
        hits = ~np.isnan(break_norm)
        min_dist[hits] = np.minimum(min_dist[hits], break_norm[hits])
        robust = int(alive.sum())
        lo_ci, hi_ci = wilson_interval(robust, n)
        results.append(EpsResult(eps, robust, n, robust / n, lo_ci, hi_ci, after, first))
    if progress:
        progress(f"{label} done", total, total)
    return CascadeOutcome(
        eps=results,
        runs=runs,
        clean_pred=clean_pred,
        correct=correct,
        broken_eps=broken_eps,
        broken_by=broken_by,
        break_norm=break_norm,
        min_dist=min_dist,
        queries=ort.counter.per_example.copy(),
        surrogate_queries=target.surrogate_counter.per_example.copy(),
        x_adv=x_adv,
    )


SENTINEL_POINTS = 32  # black-box attacks after a gradient family first try this many survivors


def _sentinel(st: Stage, stages: list[Stage], idx: np.ndarray, settings: dict, seed: int) -> np.ndarray | None:
    """The survivors a score-/decision-based stage tries first, or None for all of them.

    After a gradient family has run, Square and HopSkipJump are the masking check: on a
    model whose gradients work they break (almost) nothing the gradient attacks left. So
    they first attack a seeded sample of ``SENTINEL_POINTS`` survivors, and every other
    survivor only if that sample lost a point (``_widen``): full coverage exactly where the
    gradients were fooled, a fraction of the queries where they were not. Off when the
    profile sets ``sentinel: 0`` for the stage (the thorough profile does)."""
    if st.family not in ("black-box", "decision") or not any(s.family in GRADIENT_FAMILIES for s in stages):
        return None
    k = int(settings.get(st.attack, {}).get("sentinel", 0))
    if k <= 0 or len(idx) <= k:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(idx, size=k, replace=False))


def _widen(hit, dist, cand, sentinel, st, spec, x, y, idx, eps, norm, settings, seed, lo, hi, ort, cache):
    """Sentinel results, widened to every survivor when the sentinel sample lost a point."""
    if not hit.any():
        return hit, dist, cand, sentinel
    rest = np.setdiff1d(idx, sentinel)
    h2, d2, c2 = _attack(st, spec, x, y, rest, eps, norm, settings, seed + 1, lo, hi, ort, cache)
    order = np.argsort(np.concatenate([sentinel, rest]))
    both = np.concatenate([sentinel, rest])[order]
    return (np.concatenate([hit, h2])[order], np.concatenate([dist, d2])[order],
            np.concatenate([cand, c2])[order], both)


def _attack(st, spec, x, y, idx, eps, norm, settings, seed, lo, hi, ort, cache):
    """Run one stage on points ``idx``; return (broken mask, perturbation sizes, candidates)."""
    if spec.eps_bounded:
        cand = craft(st.attack, st.estimator, x[idx], y[idx], eps, norm, settings[st.attack], seed)
        cand = finite_or_clean(cand, x[idx])
        cand = project(cand, x[idx], eps, norm, lo, hi)
        hit = ort.labels(cand) != y[idx]
        return hit, perturbation_norms(cand, x[idx], norm), cand
    # minimal-perturbation attack: run once per point, reuse its distance at every eps
    known = cache.setdefault(st.attack, {})
    need = np.array([i for i in idx if i not in known], dtype=np.int64)
    if len(need):
        cand = craft(st.attack, st.estimator, x[need], y[need], eps, norm, settings[st.attack], seed)
        cand = finite_or_clean(cand, x[need])
        cand = np.clip(cand, lo, hi).astype(np.float32)
        d = perturbation_norms(cand, x[need], norm)
        fooled = ort.labels(cand) != y[need]
        for i, ok, v, c in zip(need, fooled, d, cand):
            known[int(i)] = (float(v) if ok and v > 0 else float("inf"), c)
    dist = np.array([known[int(i)][0] for i in idx])
    cands = np.stack([known[int(i)][1] for i in idx]).astype(np.float32)
    return dist <= eps * (1 + 1e-6), dist, cands


def finite_or_clean(cand: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A candidate with NaN/Inf (ART's Square L2 can divide by zero) is a failure, never a success."""
    bad = ~np.isfinite(cand.reshape(len(cand), -1)).all(axis=1)
    if bad.any():
        cand = cand.copy()
        cand[bad] = x[bad]
    return cand
