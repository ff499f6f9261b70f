"""The full audit's area runners: each takes the shared ``AuditContext``, runs its area through
the area's own module and leaves its results, settings, summary figures and stage records in
the context. ``AREA_RUNNERS`` is the order they run in (the OOD area fits the gate, lets the
attackers who know it evade it, then scores every family through it)."""

from __future__ import annotations

from hardening.report.runners import extraction, guarded, ood, profile, robustness
from hardening.report.runners.context import AuditContext, Progress, Steps

AREA_RUNNERS = {
    "profiling": (profile.run,),
    "robustness": (robustness.run,),
    "extraction": (extraction.run,),
    "ood": (ood.fit, guarded.run, ood.run),
}
AREAS = tuple(AREA_RUNNERS)

__all__ = ["AREAS", "AREA_RUNNERS", "AuditContext", "Progress", "Steps"]
