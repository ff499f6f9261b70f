"""The one table from a guard ``Verdict`` to an HTTP answer.

Every route (v1, v2, and any later protocol) answers a refused request through
``refusal_problem``; metrics and probation read the same ``Verdict``. A refusal's
status depends only on its decision and the stage that refused it:

====================  =============  ======  =====================================
decision              refused by     status  problem ``type`` slug
====================  =============  ======  =====================================
accepted / flagged    --             200     --
rate_limited          rate_limit     429     rate-limited (``Retry-After``)
rate_limited          extraction     429     rate-limited (PRADA throttle)
rejected              input          400     input-rejected (``check`` = sanitizer check)
rejected              anomaly        422     anomalous-input (OOD gate)
rejected              output         500     model-output-invalid (non-finite logits)
====================  =============  ======  =====================================

A non-finite model output is the model's fault, not the client's: it is a 5xx
(so a hot update that produces it fails probation), with its own type and text.
Each problem body carries ``decision`` and ``reasons`` (the verdict's wire strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime_guard.verdict import Decision, Stage, Verdict

from .problems import ApiProblem

__all__ = ["Refusal", "REFUSALS", "http_status", "refusal_problem"]


@dataclass(frozen=True)
class Refusal:
    """How one kind of refusal is answered; ``detail`` may use ``{code}`` and ``{wait}``."""

    status: int
    slug: str
    title: str
    detail: str
    check: str | None  # the problem's ``check`` member; None: the reason's code


REFUSALS: dict[tuple[Decision, Stage], Refusal] = {
    (Decision.RATE_LIMITED, Stage.RATE_LIMIT): Refusal(
        429, "rate-limited", "Too Many Requests", "request budget exhausted; retry in {wait}s", None),
    (Decision.RATE_LIMITED, Stage.EXTRACTION): Refusal(
        429, "rate-limited", "Too Many Requests", "request budget exhausted; retry in {wait}s", None),
    (Decision.REJECTED, Stage.INPUT): Refusal(
        400, "input-rejected", "Input rejected", "input failed the sanitizer's '{code}' check", None),
    (Decision.REJECTED, Stage.ANOMALY): Refusal(
        422, "anomalous-input", "Anomalous input",
        "the anomaly gate rejected this input as out of distribution", "anomaly"),
    (Decision.REJECTED, Stage.OUTPUT): Refusal(
        500, "model-output-invalid", "Model output invalid",
        "the model's output for this input is not finite; no answer is given", "output"),
}


def http_status(verdict: Verdict) -> int:
    """200 for an answered verdict, else the table's status."""
    if verdict.answered:
        return 200
    return _refusal(verdict).status


def _refusal(verdict: Verdict) -> Refusal:
    if verdict.refused_by is None:  # a guard bug, not a client error: let the 500 handler log it
        raise RuntimeError(f"refused verdict without a stage: {verdict}")
    return REFUSALS[(verdict.decision, verdict.refused_by)]


def refusal_problem(verdict: Verdict, *, wait: int | None = None,
                    headers: dict[str, str] | None = None) -> ApiProblem:
    """The problem document for a refused verdict (``wait``: Retry-After seconds of a 429)."""
    ref = _refusal(verdict)
    first = verdict.reasons[0]
    extra: dict[str, Any] = {"check": ref.check or first.code, "decision": verdict.decision.value,
                             "reasons": [r.value for r in verdict.reasons]}
    if wait is not None:
        extra = {"decision": verdict.decision.value, "reasons": extra["reasons"], "retry_after": wait}
    return ApiProblem(ref.status, ref.slug, ref.title, ref.detail.format(code=first.code, wait=wait),
                      extra=extra, headers=headers, verdict=verdict)
