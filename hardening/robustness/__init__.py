"""Adversarial robustness audit of float and compressed models, sound against gradient masking."""

from hardening.robustness.audit import ModelSpec, resolve_models, run_robustness_audit
from hardening.robustness.results import (
    AttackRun,
    EpsResult,
    ExampleResult,
    Finding,
    RobustnessReport,
    VariantResult,
)
from hardening.robustness.stats import wilson_interval

__all__ = [
    "AttackRun",
    "EpsResult",
    "ExampleResult",
    "Finding",
    "ModelSpec",
    "RobustnessReport",
    "VariantResult",
    "resolve_models",
    "run_robustness_audit",
    "wilson_interval",
]
