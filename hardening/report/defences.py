"""The report's defence table: each defence x each attacker, what it stops and at what benign cost.

Built from the summary only (figures measured elsewhere in the audit). A pairing the
audit did not measure is a row with ``measured: false`` and a note saying so, never a
blank that reads as "stopped".
"""

from __future__ import annotations


def _row(defence: str, attacker: str, threat: str, adaptive: bool, variant: str | None, metric: str,
         without: float | None, with_: float | None, benign_metric: str | None, benign: float | None,
         note: str) -> dict:
    measured = with_ is not None
    stops = None
    if measured and without is not None:
        stops = round(float(with_) - float(without), 6)
    return {"defence": defence, "attacker": attacker, "threat": threat, "adaptive": adaptive, "variant": variant,
            "metric": metric, "without_defence": without, "with_defence": with_, "gain": stops,
            "benign_cost": {"metric": benign_metric, "value": benign} if benign_metric else None,
            "measured": measured, "note": note}


def defence_table(summary: dict, policy: dict) -> list[dict]:
    """Rows for the reference variant (the float one, else the first)."""
    ref = summary.get("reference") or next(iter(summary["variants"]), None)
    if ref is None:
        return []
    s = summary["variants"][ref]
    rows: list[dict] = []
    ood = s.get("ood") or {}
    frr = ood.get("id_frr")
    for g in s.get("guarded_robust_accuracy") or []:
        e = g["eps"]
        rows.append(_row("anomaly gate", f"PGD that does not know the gate, eps {e:g}", "evasion", False, ref,
                         "robust accuracy", g["bare_robust_accuracy"], g["non_adaptive_guarded_accuracy"],
                         "false-rejection rate", frr, "plain PGD's final iterate, then the gate"))
        rows.append(_row("anomaly gate", f"{' + '.join(g['attackers'])} that know the gate, eps {e:g}", "evasion",
                         True, ref, "robust accuracy", g["bare_robust_accuracy"], g["guarded_robust_accuracy"],
                         "false-rejection rate", frr,
                         "upper bound: " + g["white_box_skipped"] if g.get("white_box_skipped") else
                         "share of points where no attacker found an accepted misclassification"))
    if not s.get("guarded_robust_accuracy"):
        rows.append(_row("anomaly gate", "evasion attackers that know the gate", "evasion", True, ref,
                         "robust accuracy", None, None, None, None, "not measured in this audit (no OOD area or skipped)"))
    if ood.get("auroc"):
        worst = min(ood["auroc"], key=ood["auroc"].get)
        rows.append(_row("anomaly gate", f"out-of-distribution inputs (worst family: {worst})", "ood", False, ref,
                         "AUROC", None, ood["min_auroc"], "false-rejection rate", frr,
                         "inputs not crafted against the gate"))
    for fam, a in (ood.get("adaptive_auroc") or {}).items():
        rows.append(_row("anomaly gate", f"accepted adaptive adversarials ({fam})", "ood", True, ref, "AUROC", None, a,
                         "false-rejection rate", frr, "accepted by construction: low by definition"))
    ext = s.get("extraction")
    victim = (policy.get("extraction") or {}).get("victim")
    if ext:
        rows.append(_row(f"output policy '{victim}'", f"best thief ({ext.get('attack')}), {ext.get('budget')} queries",
                         "extraction", False, ref, "fidelity (lower is better)", None, ext.get("fidelity_at_budget"),
                         None, None, "thieves that do not adapt to the guard"))
    matrix = s.get("adaptive_extraction") or summary.get("adaptive_extraction")
    if matrix and matrix.get("curves"):
        rows += thief_rows(matrix, ref)
    else:
        rows.append(_row("anomaly gate + PRADA monitor", "adaptive thieves (mixup of real seeds, JBDA, active "
                         "learning, data-free)", "extraction", True, ref, "fidelity", None, None, None, None,
                         "not measured in the quick profile; the thorough profile runs them (docs/extraction.md)"))
    return rows


DEFENCE_NAMES = {"gate": "anomaly gate", "guarded": "anomaly gate + PRADA monitor"}


def thief_rows(matrix: dict, variant: str | None) -> list[dict]:
    """One row per thief x defence from ``hardening.thief_matrix.summarise``: fidelity at the largest
    budget with and without the defence (bare model), queries to 90% either way, when PRADA
    first flagged it, and the defence's honest-user cost (rejections for the gate, top-1 changes
    for an output policy)."""
    curves = matrix["curves"]
    bare = {c["thief"]: c for c in curves if c["defence"] == "bare"}
    benign = matrix.get("benign") or {}
    rows = []
    for c in curves:
        if c["defence"] == "bare":
            continue
        ref = bare.get(c["thief"])
        gate = c["defence"] in DEFENCE_NAMES
        cost = benign.get(c["defence"]) or {}
        metric, value = ("false-rejection rate", cost.get("rejection_rate")) if gate else \
            ("top-1 changed", cost.get("top1_changed"))
        flagged = c.get("first_flagged_at")
        note = (f"queries to 90%: {c['queries_to_90'] or 'not reached'} (bare: "
                f"{(ref or {}).get('queries_to_90') or 'not reached'}); answered {c['answered_share'][-1]:.0%}")
        if c["defence"] == "guarded":
            note += f"; PRADA first flag at query {flagged}" if flagged else "; PRADA never flagged it"
        rows.append(_row(DEFENCE_NAMES.get(c["defence"], f"output policy '{c['defence']}'"),
                         f"{c['thief']} thief, {c['budgets'][-1]} queries", "extraction",
                         True, variant, "fidelity (lower is better)",
                         None if ref is None else ref["fidelity"][-1], c["fidelity"][-1],
                         metric if value is not None else None, value, note))
    return rows
