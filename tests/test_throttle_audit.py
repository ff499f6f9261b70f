"""The throttle monitor action measured as fidelity lost at a fixed wall-clock budget (issue #16 item 6)."""

from __future__ import annotations

import pytest

from hardening.errors import InputError


def test_throttle_costs_a_flagged_thief_answers_within_the_same_wall_clock(digits_demo):
    from hardening.throttle_audit import run_throttle_audit

    rep = run_throttle_audit(digits_demo.model_path, digits_demo.data_path, torch_source=digits_demo.torch_path,
                             attacks=["jbda"], rate_limit="60/minute", wall_seconds=200, throttle_interval=30,
                             train_steps=20)
    flag, thr = (next(r for r in rep.runs if r.action == a) for a in ("flag", "throttle"))
    assert flag.nominal_queries == thr.nominal_queries == 200
    assert flag.timed_out == 0 and flag.answered + flag.rejected == 200  # flagging alone costs it nothing
    assert thr.first_flagged_at is not None and thr.first_flagged_at == flag.first_flagged_at
    assert thr.throttled > 0 and thr.timed_out > 0
    assert thr.answered + thr.rejected + thr.timed_out == 200
    # after the flag: one query per 30 s in the remaining (200 - flagged_at) s, at most
    assert thr.answered + thr.rejected <= thr.first_flagged_at + (200 - thr.first_flagged_at) // 30 + 1
    assert rep.fidelity_loss["jbda"] == pytest.approx(flag.fidelity - thr.fidelity, abs=1e-4)


def test_throttle_audit_refuses_an_unusable_budget(digits_demo):
    from hardening.throttle_audit import run_throttle_audit

    with pytest.raises(InputError, match="allows no query"):
        run_throttle_audit(digits_demo.model_path, digits_demo.data_path, rate_limit="1/hour", wall_seconds=60)
    with pytest.raises(InputError, match="unknown attack"):
        run_throttle_audit(digits_demo.model_path, digits_demo.data_path, attacks=["nope"])
