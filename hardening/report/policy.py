"""The release policy: thresholds a report must meet and tolerances the gate allows.

A policy is a TOML file; every key is optional and missing keys take the
documented defaults (``docs/policy.md``). Parsing is strict — an unknown section
or key, a wrong type or an out-of-range value raises ``PolicyError`` naming the
key — because a typo that silently disables a check is worse than a refusal.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hardening.errors import InputError
from runtime_guard import strict
from runtime_guard.output_policy import OUTPUT_POLICIES


class PolicyError(InputError):
    """The policy file is unreadable or names an unknown/invalid setting (exit 2)."""


@dataclass
class EpsThreshold:
    eps: float
    min: float


@dataclass
class AccuracyPolicy:
    min_clean: float = 0.90  # every variant, on the eval split
    max_drop_vs_float: float = 0.03  # compressed variants vs the float model (absolute)


@dataclass
class RobustnessPolicy:
    # Minimum robust accuracy per epsilon; the audit runs at exactly these epsilons.
    min_robust_accuracy: list[EpsThreshold] = field(
        default_factory=lambda: [EpsThreshold(0.05, 0.50), EpsThreshold(0.1, 0.30)]
    )
    norm: str = "inf"
    n: int = 64  # evaluation points per variant
    fail_on_high_findings: bool = True  # e.g. "gradient masking suspected" makes the figure untrustworthy


@dataclass
class ExtractionPolicy:
    # Which victim the thresholds judge: "bare" (raw model outputs) or the runtime defence you
    # ship ("top_k", "rounded", "label_only", "reverse_sigmoid", "adaptive_misinformation", "guarded").
    victim: str = "bare"
    budget: int = 200  # attacker queries (in-distribution thief data) at which fidelity is judged
    max_fidelity: float = 0.98  # a stolen copy agreeing at least this much at `budget` fails
    target_fidelity: float = 0.90  # "stolen" means reaching this agreement ...
    min_queries_to_steal: int = 50  # ... and it must take at least this many queries


@dataclass
class OODPolicy:
    min_auroc: float = 0.85  # per family, fused ensemble score
    families: list[str] = field(default_factory=list)  # empty = every family the audit built
    max_id_frr: float = 0.10  # achieved false-rejection rate on in-distribution eval data
    alpha: float = 0.05  # target false-rejection rate the gate is calibrated for
    frr_slack: float = 0.01  # guarantee: P(true false-rejection rate > alpha + frr_slack) <= frr_delta
    frr_delta: float = 0.10


@dataclass
class BudgetPolicy:
    max_latency_p95_ms: float | None = 5.0
    max_memory_mb: float | None = 200.0
    max_size_kb: float | None = 2048.0
    max_cold_start_ms: float | None = None


@dataclass
class GatePolicy:
    """Allowed change from the baseline report before ``edgeward gate`` fails."""

    max_clean_accuracy_drop: float = 0.02  # absolute
    max_robust_accuracy_drop: float = 0.05  # absolute, per epsilon
    max_auroc_drop: float = 0.03  # absolute, per family
    max_extraction_cheaper: float = 0.25  # relative fall in queries needed to steal
    max_extraction_fidelity_rise: float = 0.05  # absolute rise of stolen-copy fidelity at the budget
    max_latency_growth: float = 0.50  # relative growth of p95 latency (noisy; generous)
    max_size_growth: float = 0.10  # relative growth of the model file


@dataclass
class Policy:
    accuracy: AccuracyPolicy = field(default_factory=AccuracyPolicy)
    robustness: RobustnessPolicy = field(default_factory=RobustnessPolicy)
    extraction: ExtractionPolicy = field(default_factory=ExtractionPolicy)
    ood: OODPolicy = field(default_factory=OODPolicy)
    budgets: BudgetPolicy = field(default_factory=BudgetPolicy)
    gate: GatePolicy = field(default_factory=GatePolicy)
    source: str | None = None  # file it came from (None = defaults)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("source")
        return d

    @property
    def eps(self) -> list[float]:
        return sorted({t.eps for t in self.robustness.min_robust_accuracy})


_SECTIONS = {
    "accuracy": AccuracyPolicy,
    "robustness": RobustnessPolicy,
    "extraction": ExtractionPolicy,
    "ood": OODPolicy,
    "budgets": BudgetPolicy,
    "gate": GatePolicy,
}
_FRACTIONS = {
    "accuracy.min_clean", "accuracy.max_drop_vs_float", "extraction.max_fidelity", "extraction.target_fidelity",
    "ood.min_auroc", "ood.max_id_frr", "ood.frr_slack", "ood.frr_delta", "gate.max_clean_accuracy_drop", "gate.max_robust_accuracy_drop",
    "gate.max_auroc_drop", "gate.max_extraction_fidelity_rise",
}


def _where(key: str) -> str:
    """``section.key`` as the user wrote it in TOML: ``[section] key``."""
    section, _, rest = key.partition(".")
    return f"[{section}] {rest}" if rest else f"[{section}]"


def _fail(key: str, message: str) -> PolicyError:
    return PolicyError(f"policy: {_where(key)} {message}" if key else f"policy: {message}")


def _number(key: str, v: Any) -> float:
    return strict.number(_fail, key, v, 0.0, 1.0 if key in _FRACTIONS else math.inf)


def _parse_eps(key: str, v: Any) -> list[EpsThreshold]:
    if not isinstance(v, list):
        raise _fail(key, "must be a list like [{eps = 0.1, min = 0.3}]")
    out = []
    for i, row in enumerate(v):
        if not isinstance(row, dict) or set(row) != {"eps", "min"}:
            raise _fail(f"{key}[{i}]", "must be a table with exactly 'eps' and 'min'")
        eps = strict.number(_fail, f"{key}[{i}].eps", row["eps"], 0.0, open_lo=True)
        out.append(EpsThreshold(eps, strict.number(_fail, f"{key}[{i}].min", row["min"], 0.0, 1.0)))
    if len({t.eps for t in out}) != len(out):
        raise _fail(key, "lists an epsilon twice")
    return out


def _parse_section(name: str, cls: type, raw: Any) -> Any:
    """One ``[section]``: each key is checked against its default's type (runtime_guard.strict)."""
    raw = strict.mapping(_fail, name, raw, (f.name for f in fields(cls)))
    kwargs: dict[str, Any] = {}
    default = cls()
    for k, v in raw.items():
        key = f"{name}.{k}"
        dv = getattr(default, k)
        if name == "budgets" and v is False:  # TOML has no null: `false` switches a budget off
            kwargs[k] = None
        elif k == "min_robust_accuracy":
            kwargs[k] = _parse_eps(key, v)
        elif isinstance(dv, bool):
            kwargs[k] = strict.boolean(_fail, key, v)
        elif isinstance(dv, str):
            kwargs[k] = strict.string(_fail, key, v)
        elif isinstance(dv, list):
            kwargs[k] = strict.strings(_fail, key, v)
        elif isinstance(dv, int):
            kwargs[k] = strict.integer(_fail, key, v, 1)
        else:
            kwargs[k] = _number(key, v)
    if name == "extraction" and "victim" in kwargs:
        strict.choice(_fail, f"{name}.victim", kwargs["victim"], ("bare", *OUTPUT_POLICIES, "guarded"))
    if name == "robustness" and "norm" in kwargs:
        strict.choice(_fail, f"{name}.norm", kwargs["norm"], ("inf", "2"))
    return cls(**kwargs)


def policy_from_dict(doc: dict, source: str | None = None) -> Policy:
    doc = strict.mapping(_fail, "", doc, _SECTIONS)
    parts = {name: _parse_section(name, cls, doc[name]) for name, cls in _SECTIONS.items() if name in doc}
    p = Policy(**parts, source=source)
    if p.ood.alpha >= 1:
        raise PolicyError("policy: [ood] alpha must be below 1")
    return p


def load_policy(path: str | Path | None) -> Policy:
    """The policy in ``path`` (TOML), or the defaults when ``path`` is None."""
    if path is None:
        return Policy()
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path}: not valid TOML ({e})") from None
    try:
        return policy_from_dict(doc, str(path))
    except PolicyError as e:
        raise PolicyError(f"{path}: {e}") from None

