"""What an extraction attacker can query with: three thief-data scenarios.

* ``in_dist``: the attacker holds a held-out split of the real distribution
  (``x_thief``). To reach budgets larger than that split we add augmented copies
  (small Gaussian noise, one-pixel shifts for images) and *say so* in
  :class:`ThiefPool` (``n_real`` vs ``n_augmented``).
* ``natural_ood``: random patches of scikit-learn's two sample photographs,
  converted to the model's channel count and resized to its input.
* ``noise``: uniform noise over the data's value range.

Every pool is deterministic for a given seed; ``actions`` groups the pool into
k-means clusters for KnockoffNets' adaptive (bandit) strategy, since the
attacker has no labels for its own data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attacks.errors import DataError, InputError

DEFAULT_SCENARIOS = ("in_dist", "natural_ood", "noise")
# Adaptive thief (issue #16): 30 real in-distribution seeds, the rest of the budget mixup
# pairs of them (lambda ~ U(0, 1)); in-distribution-looking enough to pass the anomaly gate.
SEED_MIXUP = "seed30_mixup"
N_SEEDS = 30
SCENARIOS = (*DEFAULT_SCENARIOS, SEED_MIXUP)


@dataclass
class ThiefPool:
    """Inputs for one scenario; ``x`` has at least ``budget`` rows (float32)."""

    scenario: str
    x: np.ndarray
    actions: np.ndarray  # int cluster id per row, for adaptive sampling
    n_real: int  # rows taken as-is from a source
    n_augmented: int  # rows made by perturbing real rows (in_dist only)

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "n": int(len(self.x)), "n_real": self.n_real, "n_augmented": self.n_augmented}


def _augment(x: np.ndarray, n: int, rng: np.random.Generator, lo: float, hi: float, noise: float) -> np.ndarray:
    """``n`` perturbed copies: Gaussian noise of ``noise * range`` plus, for images, a random shift of <=1 pixel."""
    idx = rng.integers(0, len(x), n)
    out = x[idx].copy()
    if out.ndim == 4:  # NCHW: shift each copy by -1..1 pixels (wrap-free: pad with the background value)
        for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(n, 2))):
            out[i] = np.roll(out[i], (int(dy), int(dx)), axis=(1, 2))
            if dy:
                out[i, :, 0 if dy > 0 else -1, :] = lo
            if dx:
                out[i, :, :, 0 if dx > 0 else -1] = lo
    out += rng.normal(0.0, noise * (hi - lo), out.shape).astype(np.float32)
    return np.clip(out, lo, hi).astype(np.float32)


def _natural_patches(n: int, shape: tuple[int, ...], rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Random square crops (16-160 px) of the sample photos, resized to ``shape`` and scaled to [lo, hi]."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    if len(shape) == 3:
        c, h, w = shape
    elif len(shape) == 1:  # flat input: use a near-square grey patch, flattened
        c, h = 1, int(np.floor(np.sqrt(shape[0])))
        w = int(np.ceil(shape[0] / h))
    else:
        raise InputError(f"natural_ood scenario needs image (C,H,W) or flat inputs, got sample shape {shape}")
    if c not in (1, 3):
        raise InputError(f"natural_ood scenario supports 1 or 3 channels, got {c}")
    out = np.empty((n, c, h, w), np.float32)
    for i in range(n):
        img = images[int(rng.integers(len(images)))]
        size = int(rng.integers(16, 161))
        y0 = int(rng.integers(0, img.shape[0] - size))
        x0 = int(rng.integers(0, img.shape[1] - size))
        patch = Image.fromarray(img[y0 : y0 + size, x0 : x0 + size]).convert("L" if c == 1 else "RGB")
        arr = np.asarray(patch.resize((w, h), Image.BOX), np.float32) / 255.0
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    out = lo + out * (hi - lo)
    if len(shape) == 1:
        return out.reshape(n, -1)[:, : shape[0]].copy()
    return out


def _clusters(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(x)))
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x.reshape(len(x), -1)).astype(np.int64)


def make_pool(
    scenario: str,
    budget: int,
    sample_shape: tuple[int, ...],
    value_range: tuple[float, float] = (0.0, 1.0),
    x_thief: np.ndarray | None = None,
    seed: int = 0,
    n_actions: int = 6,
    noise: float = 0.05,
) -> ThiefPool:
    """Build ``budget`` thief inputs for ``scenario`` (see module doc)."""
    if scenario not in SCENARIOS:
        raise InputError(f"unknown thief scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if budget <= 0:
        raise InputError(f"query budget must be positive, got {budget}")
    lo, hi = value_range
    rng = np.random.default_rng(seed)
    n_aug = 0
    if scenario == "in_dist":
        if x_thief is None or len(x_thief) == 0:
            raise DataError("in_dist scenario needs an 'x_thief' array in the data file")
        real = x_thief[rng.permutation(len(x_thief))[:budget]].astype(np.float32)
        n_aug = budget - len(real)
        x = real if n_aug <= 0 else np.concatenate([real, _augment(x_thief, n_aug, rng, lo, hi, noise)])
        n_aug = max(n_aug, 0)
    elif scenario == SEED_MIXUP:
        if x_thief is None or len(x_thief) == 0:
            raise DataError(f"{SEED_MIXUP} scenario needs an 'x_thief' (or 'x_train') array in the data file")
        seeds = x_thief[rng.permutation(len(x_thief))[:N_SEEDS]].astype(np.float32)
        n_aug = max(budget - len(seeds), 0)
        a, b = rng.integers(0, len(seeds), n_aug), rng.integers(0, len(seeds), n_aug)
        lam = rng.uniform(0.0, 1.0, (n_aug,) + (1,) * (seeds.ndim - 1)).astype(np.float32)
        x = np.concatenate([seeds, lam * seeds[a] + (1 - lam) * seeds[b]])[:budget].astype(np.float32)
        n_aug = len(x) - min(len(seeds), budget)
    elif scenario == "natural_ood":
        x = _natural_patches(budget, tuple(sample_shape), rng, lo, hi)
    else:
        x = rng.uniform(lo, hi, (budget, *sample_shape)).astype(np.float32)
    return ThiefPool(scenario, x, _clusters(x, n_actions, seed), n_real=len(x) - n_aug, n_augmented=n_aug)
