"""Every thief x every extraction defence, as fidelity-vs-budget curves (issue #16, defence table).

Thieves (each its own curve, never averaged): the 30-real-seed mixup thief (ART CopycatCNN on
``seed30_mixup``), active learning, JBDA and the data-free DFME generator, each also in its
gate-aware form (``+gate``). Defences: the bare model (reference), each runtime output policy
on its own, the OOD gate alone (``gate``) and the gate plus the PRADA monitor (``guarded``).

``run_thief_matrix`` runs the grid with ``hardening.extraction_audit`` (two audits: the mixup
thief's scenario and the adaptive thieves' in-distribution pool) and ``summarise`` reduces it to
the report's ``adaptive_extraction`` section, which ``hardening.report.defences`` turns into rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attacks.thief_data import SEED_MIXUP
from hardening.extraction_audit import VICTIMS, ExtractionReport, run_extraction_audit

# (scenario, attack): the thief's data and its algorithm
THIEVES = (
    (SEED_MIXUP, "copycat"),
    ("in_dist", "active_uncertainty"), ("in_dist", "active_uncertainty+gate"),
    ("in_dist", "jbda"), ("in_dist", "jbda+gate"),
    ("in_dist", "dfme"), ("in_dist", "dfme+gate"),
)
QUICK_THIEVES = ((SEED_MIXUP, "copycat"), ("in_dist", "active_uncertainty+gate"), ("in_dist", "jbda+gate"),
                 ("in_dist", "dfme+gate"))
DEFENCES = VICTIMS  # every defence the extraction audit knows
QUICK_DEFENCES = ("bare", "label_only", "gate", "guarded")
PROFILES = {
    "quick": {"thieves": QUICK_THIEVES, "defences": QUICK_DEFENCES, "budgets": (50, 200), "train_steps": 100},
    "full": {"thieves": THIEVES, "defences": DEFENCES, "budgets": (50, 200, 1000), "train_steps": 300},
}


def thief_name(scenario: str, attack: str) -> str:
    return "mixup_30_seeds" if (scenario, attack) == (SEED_MIXUP, "copycat") else attack


def run_thief_matrix(model_path: str | Path, dataset: Any, torch_source: str | Path | None = None,
                     profile: str = "quick", seed: int = 0, monitor: dict | None = None,
                     plot_dir: str | Path | None = None, **overrides: Any) -> dict:
    """The grid for one model; returns :func:`summarise`'s section (plots under ``plot_dir``)."""
    cfg = {**PROFILES[profile], **overrides}
    thieves: Sequence[tuple[str, str]] = cfg["thieves"]
    reports: list[ExtractionReport] = []
    for sc in dict.fromkeys(s for s, _ in thieves):
        attacks = [a for s, a in thieves if s == sc]
        reports.append(run_extraction_audit(
            model_path, dataset, torch_source=torch_source, budgets=cfg["budgets"], scenarios=[sc],
            policies=list(cfg["defences"]), attacks=attacks, train_steps=cfg["train_steps"], seed=seed,
            monitor=monitor, plot_dir=plot_dir))
    return summarise(reports, profile)


def summarise(reports: Sequence[ExtractionReport], profile: str = "custom") -> dict:
    """Per thief x defence: budgets, fidelity, queries to 90%, answered share and PRADA's first flag;
    per defence: its honest-user cost."""
    curves, benign, plots = [], {}, []
    for rep in reports:
        runs = {(r.scenario, r.victim, r.attack, r.budget): r for r in rep.runs}
        for c in rep.curves:
            rs = [runs[(c.scenario, c.victim, c.attack, b)] for b in c.budgets]
            curves.append({
                "thief": thief_name(c.scenario, c.attack), "scenario": c.scenario, "attack": c.attack,
                "defence": c.victim, "budgets": list(c.budgets), "fidelity": [round(f, 4) for f in c.fidelity],
                "queries_to_90": c.queries_to_90, "first_flagged_at": c.first_flagged_at,
                "answered_share": [round(r.answered / max(1, r.queries_sent), 4) for r in rs],
            })
        for b in rep.benign:
            benign[b.victim] = {"accuracy": round(b.accuracy, 4), "rejection_rate": round(b.rejection_rate, 4),
                                "top1_changed": round(b.top1_changed, 4), "flagged_rate": round(b.flagged_rate, 4)}
        plots += rep.plots
    return {"profile": profile, "curves": curves, "benign": benign, "plots": plots}
