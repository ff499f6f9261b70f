"""The default epsilon grid, chosen to bracket where robust accuracy falls on *this* model.

A fixed grid in fractions of the data range (5/10/20%) reads 0.0 everywhere on image
models, whose minimal L-inf perturbations are a few 1/255 steps. So when no epsilon is
given, a cheap probe first measures each of a few correctly classified points' minimal
perturbation: PGD through the first gradient route (else Square at the profile's budget)
bisecting a geometric ladder of epsilons (4 rungs per doubling), judged on the deployed session.
The grid is then the first candidate that brackets the probe's median (the fraction
grid, then for [0, 1] images of side >= 32 the usual 1, 2, 4, 8 / 255), else a grid
centred on the median (x 0.5, 1, 2). ``EpsChoice`` records what was measured and why
the grid is what it is; the report shows it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from attacks.evasion import SkipAttack, craft
from hardening.robustness.engine import Target, finite_or_clean
from hardening.robustness.stats import project

FRACTION_GRID = {"inf": (0.05, 0.1, 0.2), "2": (0.5, 1.0, 2.0)}  # fractions of the data range
IMAGE_GRID = (1 / 255, 2 / 255, 4 / 255, 8 / 255)  # L-inf, [0, 1] images
IMAGE_MIN_SIDE = 32
PROBE_POINTS = 16
LADDER_PER_OCTAVE = 4  # rungs per doubling: the probe's median is within 2**(1/4) = 19% above the true one
LADDER_STEPS = 10 * LADDER_PER_OCTAVE + 1  # width / 2**10 ... width (L-inf); times sqrt(dim) for L2


@dataclass
class EpsChoice:
    """How the epsilon grid was chosen (``method``: given | fraction | image | centred)."""

    method: str
    eps: list[float]
    reason: str
    probe_attack: str | None = None
    probe_points: int = 0
    probe_median: float | None = None  # median minimal perturbation found (upper bounds per point)
    probe_broken: int = 0  # probe points broken somewhere on the ladder
    candidates: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def given(eps: list[float]) -> EpsChoice:
    return EpsChoice("given", list(eps), "epsilons given by the caller (policy or --eps)")


def _probe_stage(target: Target, settings: dict):
    grad = next((s for s in target.stages if s.family in ("white-box", "bpda")), None)
    if grad is not None:
        return grad, "pgd", {"max_iter": 10, "num_random_init": 1}
    sq = next((s for s in target.stages if s.attack == "square"), None)
    if sq is not None:  # a weaker probe overestimates the median; Square gets the profile's own budget
        return sq, "square", dict(settings.get("square", {"max_iter": 300, "nb_restarts": 1}))
    return None, None, None


def minimal_perturbations(target: Target, x: np.ndarray, y: np.ndarray, norm: float, settings: dict, seed: int):
    """Per point, the smallest rung of a geometric epsilon ladder at which the probe attack
    fooled the session (inf where none did), by bisection over the ladder (about log2 of
    its length attack calls per point), and the probe's name; ``None`` when none can run."""
    stage, attack, s = _probe_stage(target, settings)
    if stage is None:
        return None, None
    lo_v, hi_v = target.clip_values
    width = hi_v - lo_v
    top = width if norm == np.inf else width * math.sqrt(x[0].size)
    ladder = [top * 2.0 ** ((k - LADDER_STEPS + 1) / LADDER_PER_OCTAVE) for k in range(LADDER_STEPS)]
    lo = np.full(len(x), -1)  # highest rung known not broken
    hi = np.full(len(x), LADDER_STEPS)  # lowest rung known broken (LADDER_STEPS: none yet)
    r = 0
    while (hi - lo > 1).any():
        mid = (lo + hi) // 2
        open_ = hi - lo > 1
        for k in np.unique(mid[open_]):
            idx = np.flatnonzero(open_ & (mid == k))
            eps = ladder[int(k)]
            try:
                cand = craft(attack, stage.estimator, x[idx], y[idx], eps, norm, s, seed + r)
            except SkipAttack:
                return None, None
            r += 1
            cand = project(finite_or_clean(cand, x[idx]), x[idx], eps, norm, lo_v, hi_v)
            hit = target.ort_fn.labels(cand) != y[idx]
            hi[idx[hit]] = k
            lo[idx[~hit]] = k
    found = np.array([ladder[k] if k < LADDER_STEPS else np.inf for k in hi])
    return found, f"{stage.family}/{attack}"


def _round(e: float) -> float:
    return float(f"{e:.2g}")


def choose(target: Target, x: np.ndarray, y: np.ndarray, norm: float, norm_key: str, shape: tuple[int, ...],
           settings: dict, seed: int) -> EpsChoice:
    """The default grid for this model and data (see the module docstring)."""
    lo, hi = target.clip_values
    width = hi - lo
    candidates = {"fraction": [f * width for f in FRACTION_GRID[norm_key]]}
    image = (norm_key == "inf" and len(shape) == 3 and min(shape[1:]) >= IMAGE_MIN_SIDE and lo >= 0.0 and hi <= 1.0
             and width >= 0.5)
    if image:
        candidates["image"] = list(IMAGE_GRID)
    ok = np.flatnonzero(target.ort_fn.labels(x) == y)[:PROBE_POINTS]
    found, probe = (None, None) if not len(ok) else minimal_perturbations(target, x[ok], y[ok], norm, settings, seed)
    if found is None:
        method = "image" if image else "fraction"
        why = "no correctly classified point to probe" if not len(ok) else "no gradient or score-based probe applies"
        return EpsChoice(method, candidates[method], f"{why}: the {method} grid", candidates=candidates)
    median = float(np.median(found))
    base = dict(probe_attack=probe, probe_points=len(ok), probe_broken=int(np.isfinite(found).sum()),
                probe_median=median if math.isfinite(median) else None, candidates=candidates)
    if not math.isfinite(median):
        return EpsChoice("fraction", candidates["fraction"], f"the probe broke fewer than half of {len(ok)} points "
                         f"up to the whole data range: the fraction grid (figures near the top of the range)", **base)
    for method, grid in candidates.items():
        if grid[0] <= median <= grid[-1]:
            return EpsChoice(method, grid, f"the {method} grid brackets the probe's median minimal perturbation "
                             f"{median:.3g} ({probe}, {len(ok)} points)", **base)
    grid = sorted({_round(median * f) for f in (0.5, 1.0, 2.0)})
    grid = [e for e in grid if 0 < e <= (width if norm_key == "inf" else width * math.sqrt(x[0].size))]
    return EpsChoice("centred", grid, f"no standard grid brackets the probe's median minimal perturbation "
                     f"{median:.3g} ({probe}, {len(ok)} points): the grid is centred on it (x0.5, x1, x2)", **base)
