"""Result dataclasses of a robustness audit; ``to_dict()`` gives plain JSON types."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SEVERITIES = ("info", "warning", "high")


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


@dataclass
class Finding:
    """A self-check result: ``high`` means the headline number cannot be trusted as is."""

    severity: str
    code: str
    message: str
    variant: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttackRun:
    """One attack at one epsilon: how many still-robust points it tried and broke."""

    attack: str
    family: str  # white-box | bpda | transfer | black-box | decision
    eps: float
    attacked: int
    broken: int
    queries: int  # rows evaluated by the deployed onnxruntime session
    surrogate_queries: int  # rows through the PyTorch model (gradients)
    seconds: float
    skipped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpsResult:
    eps: float
    robust: int
    n: int
    robust_accuracy: float
    ci_low: float
    ci_high: float
    robust_after_family: dict[str, float] = field(default_factory=dict)  # cumulative, in cascade order
    broken_by: dict[str, int] = field(default_factory=dict)  # attack -> points it broke first at this eps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExampleResult:
    """One evaluation point. ``broken_at_eps`` is None for points no attack broke, which
    are robust beyond ``robust_beyond`` (the largest epsilon) — never "distance 0"."""

    index: int  # row in the dataset's 'x'
    label: int
    clean_pred: int
    correct: bool
    broken_at_eps: float | None
    broken_by: str | None
    norm: float | None  # size of the adversarial perturbation that broke it
    min_distance: float | None  # smallest successful perturbation found at any epsilon
    robust_beyond: float | None
    queries: int
    surrogate_queries: int

    def to_dict(self) -> dict:
        return _clean(asdict(self))


@dataclass
class VariantResult:
    name: str
    path: str
    kind: str
    role: str  # white-box | compressed | black-box
    families: list[str]
    clean_accuracy: float
    agreement_with_parent: float | None
    eps: list[EpsResult]
    attacks: list[AttackRun]
    examples: list[ExampleResult]
    median_distance: float | None
    median_is_lower_bound: bool
    gradient_check: dict = field(default_factory=dict)
    seconds: float = 0.0
    output_convention: str = "logits"  # logits | probabilities (a final Softmax, attacked on log-probabilities)
    gradient_routes: list[dict] = field(default_factory=list)  # [{family, gradients}] that actually ran
    upper_bound: bool = False  # True: masking or no gradient route; the figure is an unreliable upper bound
    upper_bound_reason: str | None = None
    budgets: dict = field(default_factory=dict)  # input dimension, budget factor, the iteration budgets that ran

    def robust_at(self, eps: float) -> EpsResult:
        return min(self.eps, key=lambda e: abs(e.eps - eps))

    def to_dict(self) -> dict:
        d = _clean(asdict(self))
        return d


@dataclass
class RobustnessReport:
    profile: str
    norm: str
    eps: list[float]
    n: int
    seed: int
    clip_values: tuple[float, float]
    variants: list[VariantResult]
    findings: list[Finding]
    seconds: float
    execution: dict = field(default_factory=dict)  # executor, workers, per-shard timing and where it ran
    eps_choice: dict = field(default_factory=dict)  # how the epsilon grid was chosen (eps_grid.EpsChoice)

    @property
    def worst_severity(self) -> str | None:
        levels = [SEVERITIES.index(f.severity) for f in self.findings]
        return SEVERITIES[max(levels)] if levels else None

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_dict(self) -> dict:
        return _clean(asdict(self))
