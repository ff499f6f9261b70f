"""Adaptive thief through the guard (issue #16 item 3, first part): 30 real seeds + mixup."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.thief_data import N_SEEDS, SEED_MIXUP, make_pool
from hardening.errors import InputError
from hardening.extraction_audit import run_extraction_audit


def test_seed_mixup_pool_has_30_real_rows_and_mixes_only_them():
    rng = np.random.default_rng(0)
    x_thief = rng.uniform(0, 1, (100, 1, 8, 8)).astype(np.float32)
    pool = make_pool(SEED_MIXUP, 200, (1, 8, 8), (0.0, 1.0), x_thief, seed=3)
    assert len(pool.x) == 200 and pool.n_real == N_SEEDS and pool.n_augmented == 170
    seeds = pool.x[:N_SEEDS].reshape(N_SEEDS, -1)
    assert all(any(np.array_equal(s, t) for t in x_thief.reshape(100, -1)) for s in seeds)
    assert pool.x.min() >= 0 and pool.x.max() <= 1


@pytest.mark.slow
def test_mixup_thief_fidelity_through_the_guard_is_its_own_curve(digits_demo):
    rep = run_extraction_audit(
        digits_demo.model_path, digits_demo.data_path, torch_source=digits_demo.torch_path,
        budgets=[50, 200], scenarios=[SEED_MIXUP, "noise"], policies=["bare", "guarded"],
        attacks=["copycat"], rate_limit="60/minute", sybil_keys=10, train_steps=100,
    )
    guarded = rep.curve(SEED_MIXUP, "guarded", "copycat")
    noise = rep.curve("noise", "guarded", "copycat")
    assert guarded.budgets == [50, 200] and len(guarded.fidelity) == 2
    # reported per thief, not averaged with the noise thief the gate stops
    assert guarded.fidelity[-1] > noise.fidelity[-1]
    assert guarded.fidelity[-1] >= 0.7  # the gate answers mixups of real digits: the copy works
    d = rep.to_dict()
    assert any(c["scenario"] == SEED_MIXUP and c["victim"] == "guarded" for c in d["curves"])


MONITOR = {"delta": 0.5, "min_queries": 50, "center": [0.5] * 64, "scale": [0.3] * 64, "max_rejection_rate": 0.3,
           "min_label_entropy": None}


def test_guarded_victim_uses_the_given_monitor_config(digits_demo):
    """Small: the noise thief through the guard with a shipped (standardised, rejection-signal) monitor is
    flagged; the fixed-delta PRADA default flags no noise thief (docs/extraction.md)."""
    rep = run_extraction_audit(
        digits_demo.model_path, digits_demo.data_path, torch_source=digits_demo.torch_path,
        budgets=[100], scenarios=["noise"], policies=["guarded"], attacks=["copycat"], train_steps=20,
        monitor=MONITOR,
    )
    assert rep.monitor == {"calibrated": True, "delta": 0.5, "min_queries": 50, "max_rejection_rate": 0.3,
                           "min_label_entropy": None}
    run = rep.runs[0]
    assert run.rejected == 100 and run.first_flagged_at == 50  # rejections signal, judged from min_queries on
    with pytest.raises(InputError, match="another model"):
        run_extraction_audit(digits_demo.model_path, digits_demo.data_path, budgets=[50], scenarios=["noise"],
                             policies=["guarded"], attacks=["copycat"], train_steps=5,
                             monitor={"model_sha256": "0" * 64, "config": MONITOR})
