"""Small statistics helpers: Wilson intervals and perturbation norms."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sane at 0 and n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def perturbation_norms(x_adv: np.ndarray, x: np.ndarray, norm: float) -> np.ndarray:
    d = (x_adv - x).reshape(len(x), -1).astype(np.float64)
    return np.abs(d).max(axis=1) if norm == np.inf else np.linalg.norm(d, axis=1)


def project(x_adv: np.ndarray, x: np.ndarray, eps: float, norm: float, lo: float, hi: float) -> np.ndarray:
    """Force candidates into the eps-ball around ``x`` and the data range, so a result is
    never counted for a perturbation larger than the threat model allows."""
    d = (x_adv - x).astype(np.float32)
    if norm == np.inf:
        d = np.clip(d, -eps, eps)
    else:
        n = np.linalg.norm(d.reshape(len(d), -1), axis=1)
        scale = np.minimum(1.0, eps / np.maximum(n, 1e-12)).astype(np.float32)
        d = d * scale.reshape((-1,) + (1,) * (d.ndim - 1))
    return np.clip(x + d, lo, hi).astype(np.float32)


def median_distance(dist: np.ndarray) -> tuple[float | None, bool]:
    """Median of per-example minimal distances, ``inf`` meaning "not broken".

    Returns ``(value, is_lower_bound)``: if the median falls on an unbroken example the
    true value is only known to exceed the largest epsilon tried, so we return None.
    """
    if len(dist) == 0:
        return None, False
    m = float(np.median(dist))
    if math.isinf(m):
        return None, True
    return m, False
