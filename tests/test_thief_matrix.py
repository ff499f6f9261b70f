"""Every thief x every extraction defence in the defence table (issue #16 item 5)."""

from __future__ import annotations

import pytest

from attacks.thief_data import SEED_MIXUP


def _matrix(digits_demo, thieves):
    from hardening.thief_matrix import run_thief_matrix

    return run_thief_matrix(digits_demo.model_path, digits_demo.data_path, torch_source=digits_demo.torch_path,
                            thieves=thieves, defences=("bare", "label_only", "gate", "guarded"), budgets=(60,),
                            train_steps=20)


def test_each_adaptive_thief_gets_its_own_curve_and_row_per_defence(digits_demo):
    from hardening.report.defences import defence_table

    m = _matrix(digits_demo, (("in_dist", "jbda+gate"), ("in_dist", "dfme+gate")))
    got = {(c["thief"], c["defence"]) for c in m["curves"]}
    assert got == {(t, d) for t in ("jbda+gate", "dfme+gate") for d in ("bare", "label_only", "gate", "guarded")}
    by = {(c["thief"], c["defence"]): c for c in m["curves"]}
    assert by[("jbda+gate", "gate")]["first_flagged_at"] is None  # no monitor behind the gate-only defence
    assert by[("jbda+gate", "bare")]["answered_share"] == [1.0]
    assert m["benign"]["gate"]["rejection_rate"] > 0 and m["benign"]["bare"]["rejection_rate"] == 0
    rows = defence_table({"reference": "float", "variants": {"float": {"adaptive_extraction": m}}}, {})
    ext = [r for r in rows if r["threat"] == "extraction"]
    assert len(ext) == 6 and all(r["measured"] and r["adaptive"] for r in ext)  # 2 thieves x 3 defences
    row = next(r for r in ext if r["attacker"].startswith("dfme+gate") and r["defence"] == "anomaly gate")
    assert row["with_defence"] == by[("dfme+gate", "gate")]["fidelity"][-1]
    assert row["without_defence"] == by[("dfme+gate", "bare")]["fidelity"][-1]
    assert row["benign_cost"]["metric"] == "false-rejection rate"


@pytest.mark.slow
def test_mixup_thief_has_its_own_row_per_defence(digits_demo):
    from hardening.report.defences import defence_table

    m = _matrix(digits_demo, ((SEED_MIXUP, "copycat"), ("in_dist", "jbda+gate")))
    got = {(c["thief"], c["defence"]) for c in m["curves"]}
    assert got == {(t, d) for t in ("mixup_30_seeds", "jbda+gate") for d in ("bare", "label_only", "gate", "guarded")}
    by = {(c["thief"], c["defence"]): c for c in m["curves"]}
    assert by[("jbda+gate", "gate")]["first_flagged_at"] is None  # no monitor behind the gate-only defence
    assert by[("mixup_30_seeds", "bare")]["answered_share"] == [1.0]
    assert m["benign"]["gate"]["rejection_rate"] > 0 and m["benign"]["bare"]["rejection_rate"] == 0

    rows = defence_table({"reference": "float", "variants": {"float": {"adaptive_extraction": m}}}, {})
    ext = [r for r in rows if r["threat"] == "extraction"]
    assert len(ext) == 6 and all(r["measured"] and r["adaptive"] for r in ext)  # 2 thieves x 3 defences
    mix = next(r for r in ext if r["attacker"].startswith("mixup_30_seeds") and r["defence"].endswith("PRADA monitor"))
    assert mix["with_defence"] == by[("mixup_30_seeds", "guarded")]["fidelity"][-1]  # its own figure, not an average
    assert mix["without_defence"] == by[("mixup_30_seeds", "bare")]["fidelity"][-1]
    assert mix["benign_cost"]["metric"] == "false-rejection rate"


def test_defence_table_says_when_thieves_were_not_measured():
    from hardening.report.defences import defence_table

    rows = defence_table({"reference": "float", "variants": {"float": {}}}, {})
    (row,) = [r for r in rows if r["threat"] == "extraction"]
    assert not row["measured"] and "not measured" in row["note"]
