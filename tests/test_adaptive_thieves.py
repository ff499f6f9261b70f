"""Adaptive thief through the guard (issue #16 item 3, first part): 30 real seeds + mixup."""

from __future__ import annotations

import numpy as np

from attacks.thief_data import N_SEEDS, SEED_MIXUP, make_pool
from hardening.extraction_audit import run_extraction_audit


def test_seed_mixup_pool_has_30_real_rows_and_mixes_only_them():
    rng = np.random.default_rng(0)
    x_thief = rng.uniform(0, 1, (100, 1, 8, 8)).astype(np.float32)
    pool = make_pool(SEED_MIXUP, 200, (1, 8, 8), (0.0, 1.0), x_thief, seed=3)
    assert len(pool.x) == 200 and pool.n_real == N_SEEDS and pool.n_augmented == 170
    seeds = pool.x[:N_SEEDS].reshape(N_SEEDS, -1)
    assert all(any(np.array_equal(s, t) for t in x_thief.reshape(100, -1)) for s in seeds)
    assert pool.x.min() >= 0 and pool.x.max() <= 1


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
