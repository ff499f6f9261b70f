"""The gate's per-request work budget, fixed at fit time and recorded in ``detectors.json``.

The device pays for the gate on every request: the compact input view (pooling or a
projection of the raw input) and one float32 product per view whose matrix stacks every
detector's exported block (a kNN bank of B rows of width D is B*D values, a Mahalanobis
factor D*r, PCA components r*D). ``GateBudget`` bounds both: the view's width and each
detector's matrix; the fitted file records the budget and the multiply-adds per request it
led to (``AnomalyScorer.work``), so a reviewer sees the cost without running anything.

Defaults (``benchmarks/bench_ood.py`` / ``bench_fusion.py``, BENCHMARKS.md "Gate budget"):
256 input values (a 3x96x96 image pools to 3x8x8) and 2^16 values per detector matrix. On the
digits demo nothing is cut (64 raw input values, 128-d features, banks of 487 rows fit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hardening.errors import InputError


@dataclass(frozen=True)
class GateBudget:
    input_values: int = 256  # width of the compact input view the input detectors read
    matrix_values: int = 2**16  # values of each detector's exported matrix

    def __post_init__(self) -> None:
        if self.input_values < 1 or self.matrix_values < 1:
            raise InputError(f"gate budget must be positive, got {self}")

    def to_meta(self, work: dict[str, int]) -> dict[str, Any]:
        """``budget`` entry of ``detectors.json``: the limits and the per-request work they gave."""
        return {**asdict(self), "macs_per_request": work}


# the budget the previous release used (3x96x96 -> 3x16x16, 2^17 values per matrix), for benchmarks
PREVIOUS = GateBudget(input_values=1024, matrix_values=2**17)
