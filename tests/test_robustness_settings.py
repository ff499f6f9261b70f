"""Audit settings that fit the data (#15 item 8): the default epsilon grid brackets where
robust accuracy falls, query budgets scale with the input dimension, and the iteration
self-check flags and escalates an attack that has not converged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks.evasion import PROFILES, budget_factor, scale_budgets
from hardening.reference_models import upsampled_digits
from hardening.robustness import checks, run_robustness_audit
from hardening.robustness.results import Finding

from foreign_models import export


class _Linear(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def linear32(tmp_path_factory):
    """A softmax-regression classifier on 3x32x32 upsampled digits, as ONNX + data."""
    d = upsampled_digits(32, 3)
    torch.manual_seed(0)
    m = _Linear(3 * 32 * 32, 10)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    xt, yt = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        i = torch.randint(0, len(xt), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(m(xt[i]), yt[i]).backward()
        opt.step()
    out = tmp_path_factory.mktemp("linear32")
    path = export(m.eval(), d["x"], out / "model.onnx", "pixels", "logits")
    np.savez(out / "data.npz", **d)
    return str(path), str(out / "data.npz")


def test_query_budgets_scale_with_the_input_dimension():
    quick = PROFILES["quick"]
    assert scale_budgets(quick, 64) is quick  # the 8x8 demo keeps its budgets
    big = scale_budgets(quick, 3 * 96 * 96)
    f = budget_factor(3 * 96 * 96)
    assert 5 < f <= 8
    assert big["square"]["max_iter"] == round(quick["square"]["max_iter"] * f)
    assert big["hsj"]["max_iter"] == round(quick["hsj"]["max_iter"] * f)
    assert big["apgd-ce"] == quick["apgd-ce"]  # gradient attacks do not need more steps per dimension
    assert budget_factor(10**9) == 8.0


@pytest.mark.slow
def test_square_that_keeps_improving_with_more_queries_is_escalated(linear32):
    path, data = linear32
    kw = dict(eps=[0.1], n=32, attacks=["square"], seed=0)
    plain = run_robustness_audit([path], data, self_checks=False, **kw).variants[0]
    rep = run_robustness_audit([path], data, **kw)
    v = rep.variants[0]
    assert v.budgets["dimension"] == 3072 and v.budgets["square"]["max_iter"] > PROFILES["quick"]["square"]["max_iter"]
    it = v.gradient_check["iterations"]
    assert it["robust"][0] > it["robust"][1]  # doubling Square's queries still broke points
    codes = {f.code for f in rep.findings}
    assert codes & {"ITERATIONS_ESCALATED", "ITERATIONS_NOT_CONVERGED"}, codes
    mult = v.budgets["escalated"]["multiplier"]
    assert mult >= 2 and any(r.attack == f"square-x{mult}" and r.attacked > 0 for r in v.attacks)
    # the escalated figure counts what the longer runs broke: lower than the 1x cascade's
    assert v.robust_at(0.1).robust_accuracy < plain.robust_at(0.1).robust_accuracy
    broken = sum(ex.correct and ex.broken_at_eps is not None for ex in v.examples)
    assert v.robust_at(0.1).robust == sum(ex.correct for ex in v.examples) - broken


def test_still_falling_at_the_iteration_cap_is_an_upper_bound(linear32, monkeypatch):
    monkeypatch.setattr(checks, "ITER_MAX_MULT", 4)  # the same Square still falls from 2x to 4x
    path, data = linear32
    rep = run_robustness_audit([path], data, eps=[0.1], n=32, attacks=["square"], seed=0)
    v = rep.variants[0]
    f = next(f for f in rep.findings if f.code == "ITERATIONS_NOT_CONVERGED")
    assert f.severity == "high" and "upper bound" in f.message
    assert v.gradient_check["iterations"]["converged"] is False and v.budgets["escalated"]["multiplier"] == 4
    assert v.upper_bound
    # the same finding makes a model with a gradient route an upper bound too
    assert "not converged" in checks.upper_bound_reason(v, [f], True, None)
    ok = Finding("warning", "ITERATIONS_ESCALATED", "converged after escalation", v.name)
    assert checks.upper_bound_reason(v, [ok], True, None) is None


def test_converged_attacks_are_not_escalated(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=digits_demo.torch_path,
                               eps=[0.1], n=48, seed=0, attacks=["fgsm", "pgd", "apgd-ce"])
    v = rep.variants[0]
    it = v.gradient_check["iterations"]
    assert it["converged_at"] == 1 and "escalated" not in v.budgets, it
    assert not {f.code for f in rep.findings} & {"ITERATIONS_ESCALATED", "ITERATIONS_NOT_CONVERGED"}


def test_default_grid_on_the_demo_brackets_the_measured_median(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=digits_demo.torch_path,
                               n=48, seed=0, attacks=["fgsm", "pgd", "apgd-ce"], self_checks=False)
    c = rep.eps_choice
    assert c["method"] == "fraction" and c["probe_attack"] == "white-box/pgd" and c["probe_points"] == 16
    assert rep.eps[0] <= c["probe_median"] <= rep.eps[-1] and rep.eps == c["eps"]
    r = [e.robust_accuracy for e in rep.variants[0].eps]
    assert r[0] > 0.5 and r[-1] < 0.25  # robust accuracy falls inside the grid


def test_default_grid_is_centred_when_the_range_grid_reads_nothing(digits_demo, tmp_path):
    """One outlier row stretches the data range 100x: 5/10/20% of it would read 0.0 everywhere."""
    d = dict(np.load(digits_demo.data_path))
    d["x_train"] = d["x_train"].copy()
    d["x_train"][0] = 100.0
    np.savez(tmp_path / "d.npz", **d)
    rep = run_robustness_audit([digits_demo.model_path], str(tmp_path / "d.npz"),
                               torch_source=digits_demo.torch_path, n=48, seed=0, attacks=["fgsm", "pgd", "apgd-ce"],
                               self_checks=False)
    c = rep.eps_choice
    assert c["method"] == "centred", c
    assert rep.eps[0] < c["probe_median"] < rep.eps[-1] < 5.0  # 5% of the stretched range
    r = [e.robust_accuracy for e in rep.variants[0].eps]
    assert r[0] > r[-1] and r[0] > 0.3, r
    assert "centred" in c["reason"] and c["candidates"]["fraction"][0] == pytest.approx(5.0)


def test_given_epsilons_are_recorded_as_given(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=digits_demo.torch_path,
                               eps=[0.1], n=16, seed=0, attacks=["fgsm"], self_checks=False)
    assert rep.eps_choice["method"] == "given" and rep.eps_choice["eps"] == [0.1]
