"""Telemetry rollback rules for ``ModelHolder``: ``runtime_guard.update.triggers`` applied to
the guard's own telemetry (the new deployment's snapshot against the previous one's at the swap)."""

from __future__ import annotations

from typing import Any

from runtime_guard.update.triggers import Figures, ProbationRules, judge

from .reload import Deployment


class TelemetryJudge:
    """``ProbationJudge`` over ``GuardedModel.telemetry.snapshot()``; runs every ``every`` requests."""

    def __init__(self, rules: ProbationRules | None = None, every: int = 10) -> None:
        self.rules = rules or ProbationRules()
        self.every = every

    def reference(self, previous: Deployment) -> Figures:
        return Figures.from_snapshot(previous.model.telemetry.snapshot())

    def judge(self, deployment: Deployment, reference: Any) -> tuple[str | None, dict[str, Any]]:
        ref = reference if isinstance(reference, Figures) else Figures.from_snapshot(None)
        live = Figures.from_snapshot(deployment.model.telemetry.snapshot())
        verdict = judge(live, ref, self.rules)
        return verdict.trigger, {**verdict.evidence, "live": live.to_dict(), "reference": ref.to_dict(),
                                 "rules": self.rules.to_dict()}
