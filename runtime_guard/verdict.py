"""The guard's request contract: what ``GuardedModel.predict`` decided and why.

A :class:`Verdict` is produced once by the guard and read as is by telemetry,
the API (``api.decisions`` maps it to an HTTP status), the Prometheus metrics
and the audits' victims; nobody parses reason strings. Enum values are the
wire strings (JSON bodies, telemetry keys, metric labels), so they stay stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Decision", "Stage", "Reason", "Verdict", "ANSWERED", "ACCEPTED"]


class Decision(str, Enum):
    """Outcome of one request. ``accepted``/``flagged`` carry an answer; the others do not."""

    ACCEPTED = "accepted"
    FLAGGED = "flagged"
    REJECTED = "rejected"
    RATE_LIMITED = "rate_limited"

    def __str__(self) -> str:
        return self.value


ANSWERED = frozenset({Decision.ACCEPTED, Decision.FLAGGED})


class Stage(str, Enum):
    """The defence that gave a reason, in the order ``predict`` runs them."""

    EXTRACTION = "extraction"  # the PRADA monitor (throttle before, flag after the model)
    RATE_LIMIT = "rate_limit"
    INPUT = "input"  # the sanitizer
    OUTPUT = "output"  # the model's own output (non-finite logits)
    ANOMALY = "anomaly"  # the OOD gate

    def __str__(self) -> str:
        return self.value


class Reason(str, Enum):
    """Every reason the guard can give: ``value`` is the wire string, plus ``stage`` and ``code``."""

    stage: Stage
    code: str

    def __new__(cls, wire: str, stage: Stage, code: str) -> Reason:
        obj = str.__new__(cls, wire)
        obj._value_ = wire
        obj.stage = stage
        obj.code = code
        return obj

    def __str__(self) -> str:
        return str(self.value)

    EXTRACTION_THROTTLED = ("extraction:throttled", Stage.EXTRACTION, "throttled")
    RATE_LIMIT_CLIENT = ("rate_limit:client", Stage.RATE_LIMIT, "client")
    RATE_LIMIT_GLOBAL = ("rate_limit:global", Stage.RATE_LIMIT, "global")
    INPUT_BYTES = ("input:bytes", Stage.INPUT, "bytes")
    INPUT_NOT_NUMERIC = ("input:not_numeric", Stage.INPUT, "not_numeric")
    INPUT_DTYPE = ("input:dtype", Stage.INPUT, "dtype")
    INPUT_SHAPE = ("input:shape", Stage.INPUT, "shape")
    INPUT_BATCH_SIZE = ("input:batch_size", Stage.INPUT, "batch_size")
    INPUT_NON_FINITE = ("input:non_finite", Stage.INPUT, "non_finite")
    INPUT_RANGE = ("input:range", Stage.INPUT, "range")
    OUTPUT_NON_FINITE = ("output:non_finite", Stage.OUTPUT, "non_finite")
    OOD = ("ood", Stage.ANOMALY, "ood")
    EXTRACTION = ("extraction", Stage.EXTRACTION, "flagged")

    @classmethod
    def of(cls, stage: Stage, code: str) -> Reason:
        """The member for (stage, code); KeyError for a pair the guard never gives."""
        return _BY_PARTS[(stage, code)]


_BY_PARTS = {(r.stage, r.code): r for r in Reason}


@dataclass(frozen=True)
class Verdict:
    """``decision`` plus its ``reasons`` (in the order the stages gave them).

    ``refused_by`` is the stage that refused the request (None when it was
    answered); it alone picks the HTTP status of a refusal.
    """

    decision: Decision
    reasons: tuple[Reason, ...] = ()
    refused_by: Stage | None = None

    @classmethod
    def refused(cls, decision: Decision, reason: Reason, *more: Reason) -> Verdict:
        return cls(decision, (reason, *more), reason.stage)

    @property
    def answered(self) -> bool:
        return self.decision in ANSWERED


# The common answer, built once: verdicts are immutable, so every plain acceptance shares it.
ACCEPTED = Verdict(Decision.ACCEPTED)
