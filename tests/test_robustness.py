"""Robustness audit: real ART attacks, real onnxruntime sessions, small quick-profile runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attacks.estimators import OrtLogits, QueryCounter, onnx_classifier, torch_classifier
from attacks.evasion import PROFILES
from hardening.cli.common import dumps
from hardening.data import load_dataset
from hardening.errors import DataError, InputError, ModelError
from hardening.intake import load_model, make_session
from hardening.robustness import run_robustness_audit, wilson_interval
from hardening.robustness.checks import check_against_parent, check_family_gaps
from hardening.robustness.engine import Stage, Target, finite_or_clean, run_cascade
from hardening.robustness.masking import RoundInput
from hardening.robustness.results import AttackRun, EpsResult, VariantResult
from hardening.robustness.stats import median_distance, project
from hardening.torch_source import export_onnx, load_torch_source


@pytest.fixture(scope="module")
def masked(digits_demo, tmp_path_factory):
    module = RoundInput(load_torch_source(digits_demo.torch_path)).eval()
    path = tmp_path_factory.mktemp("masked") / "masked.onnx"
    x = load_dataset(digits_demo.data_path).x
    export_onnx(module, torch.from_numpy(x[:2]), path)
    return path, module


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_project_and_median():
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 8, 8)).astype(np.float32)
    adv = x + rng.normal(0, 1, x.shape).astype(np.float32)
    p = project(adv, x, 0.1, np.inf, 0.0, 1.0)
    assert np.abs(p - x).max() <= 0.1 + 1e-6 and p.min() >= 0 and p.max() <= 1
    p2 = project(adv, x, 0.5, 2, 0.0, 1.0)
    assert (np.linalg.norm((p2 - x).reshape(4, -1), axis=1) <= 0.5 + 1e-5).all()
    assert median_distance(np.array([0.1, 0.2, np.inf])) == (pytest.approx(0.2), False)
    assert median_distance(np.array([0.1, np.inf, np.inf])) == (None, True)  # never "distance 0"


def test_non_finite_candidates_fall_back_to_the_clean_input():
    x = np.zeros((3, 4), np.float32)
    cand = np.array([[0.1] * 4, [np.nan, 0, 0, 0], [np.inf, 0, 0, 0]], np.float32)
    out = finite_or_clean(cand, x)
    assert out[0].tolist() == pytest.approx([0.1] * 4) and (out[1:] == 0).all()


def test_cascade_adversarials_are_real_on_the_deployed_model(digits_demo):
    """Every point counted as broken really is misclassified by onnxruntime inside the ball."""
    ds = load_dataset(digits_demo.data_path)
    info = load_model(digits_demo.model_path)
    ort_fn = OrtLogits(make_session(digits_demo.model_path), info.input_name, info.logits_output, ds.sample_shape)
    sur = QueryCounter()
    est = torch_classifier(load_torch_source(digits_demo.torch_path), ds.sample_shape, 6, (0.0, 1.0), sur)
    stages = [Stage("white-box", "fgsm", est), Stage("white-box", "pgd", est),
              Stage("black-box", "square", onnx_classifier(ort_fn, 6, (0.0, 1.0)))]
    x, y = ds.x[:40], ds.y[:40]
    out = run_cascade(Target(ort_fn, sur, stages, (0.0, 1.0)), x, y, [0.05, 0.15], np.inf, PROFILES["quick"], seed=0)
    assert out.queries.sum() == ort_fn.counter.total and sur.per_example.sum() == sur.total
    broken = ~np.isnan(out.broken_eps)
    assert broken.sum() > 5
    assert (ort_fn.labels(out.x_adv[broken]) != y[broken]).all()
    norms = np.abs(out.x_adv - x).reshape(len(x), -1).max(1)
    assert (norms[broken] <= out.broken_eps[broken] + 1e-6).all()
    assert (out.x_adv[~broken] == x[~broken]).all()
    # later epsilons only attack survivors, and each attack only the points still correct
    r = {(a.eps, a.attack): a for a in out.runs}
    assert r[(0.15, "fgsm")].attacked == out.eps[0].robust
    assert r[(0.05, "pgd")].attacked == r[(0.05, "fgsm")].attacked - r[(0.05, "fgsm")].broken
    assert out.eps[1].robust <= out.eps[0].robust


def test_float_audit_white_box_report(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=digits_demo.torch_path,
                               eps=[0.05, 0.2], n=32, seed=0)
    v = rep.variants[0]
    assert v.role == "white-box" and v.families == ["white-box", "black-box", "decision"]
    assert v.clean_accuracy > 0.9
    e1, e2 = v.eps
    assert e2.robust_accuracy <= e1.robust_accuracy <= v.clean_accuracy
    assert e1.ci_low <= e1.robust_accuracy <= e1.ci_high
    assert e2.robust_accuracy < 0.5  # eps 0.2 breaks most of this undefended CNN
    robust = [ex for ex in v.examples if ex.broken_at_eps is None and ex.correct]
    assert len(robust) == e2.robust
    assert all(ex.robust_beyond == 0.2 and ex.norm is None for ex in robust)
    for ex in v.examples:
        if ex.broken_at_eps is not None:
            assert ex.norm <= ex.broken_at_eps + 1e-6 and ex.broken_by and ex.queries > 0
    assert v.gradient_check["zero"] == 0 and v.gradient_check["sanity"]["robust_accuracy"] <= 0.1
    assert not [f for f in rep.findings if f.severity == "high"], rep.findings
    assert {r.attack for r in v.attacks} == {"fgsm", "pgd", "apgd-ce", "apgd-t", "square", "hsj"}
    d = json.loads(dumps(rep))
    assert d["variants"][0]["eps"][1]["eps"] == 0.2 and len(d["variants"][0]["examples"]) == 32


def test_same_seed_same_result(digits_demo):
    kw = dict(torch_source=digits_demo.torch_path, eps=[0.1], n=24, attacks=["fgsm", "pgd", "square"],
              self_checks=False)
    a = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, seed=3, **kw).variants[0]
    b = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, seed=3, **kw).variants[0]
    assert [e.to_dict() for e in a.examples] == [e.to_dict() for e in b.examples]


def test_masked_model_is_flagged_and_still_measured(masked, digits_demo):
    path, module = masked
    kw = dict(eps=[0.1], n=32, seed=0, self_checks=False)  # gradient + family-gap checks always run
    rep_m = run_robustness_audit([path], digits_demo.data_path, torch_source=module, **kw)
    rep_u = run_robustness_audit([digits_demo.model_path], digits_demo.data_path,
                                 torch_source=digits_demo.torch_path, **kw)
    codes = {f.code for f in rep_m.findings}
    assert "ZERO_GRADIENTS" in codes and codes & {"BPDA_BEATS_WHITEBOX", "BLACKBOX_BEATS_WHITEBOX"}
    assert not codes & {f.code for f in rep_u.findings}
    vm, vu = rep_m.variants[0], rep_u.variants[0]
    assert vm.clean_accuracy == pytest.approx(vu.clean_accuracy, abs=0.05)
    for em, eu in zip(vm.eps, vu.eps):
        assert em.robust_after_family["white-box"] > em.robust_accuracy  # gradients alone were fooled
        assert em.robust_accuracy <= eu.robust_accuracy + 0.1  # the ensemble still measures it
    assert vm.gradient_check["zero"] > 0 and "escalated" in vm.gradient_check
    assert vm.gradient_check["restored_by"] == "onnx-graph" and vm.families[:2] == ["white-box", "bpda"]
    assert {"family": "bpda", "gradients": "onnx-graph"} in vm.gradient_routes
    assert "Round" in vm.gradient_check["graph"]["non_differentiable"]


def test_compressed_variants_are_attacked_through_every_route(digits_variants, digits_demo):
    chosen = [v for v in digits_variants if v.kind in ("float", "int8_static")]
    rep = run_robustness_audit(chosen, digits_demo.data_path, eps=[0.1], n=32, seed=0,
                               attacks=["fgsm", "pgd", "square", "hsj"])
    f, q = rep.variant("float"), rep.variant("int8_static")
    assert f.role == "white-box" and q.role == "compressed"
    assert q.families == ["bpda", "transfer", "black-box", "decision"]
    assert q.agreement_with_parent >= 0.9
    ran = {(r.family, r.attack) for r in q.attacks}
    assert {("bpda", "pgd"), ("transfer", "pgd"), ("black-box", "square"), ("decision", "hsj")} <= ran
    e = q.eps[0]
    assert e.robust_accuracy <= min(e.robust_after_family.values()) + 1e-12
    assert e.robust_accuracy <= q.clean_accuracy


def test_onnx_without_source_gets_gradients_from_its_own_graph(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, eps=[0.1], n=16,
                               attacks=["pgd", "square"], self_checks=False)
    v = rep.variants[0]
    assert v.role == "white-box" and v.families == ["white-box", "black-box"]
    assert v.gradient_routes == [{"family": "white-box", "gradients": "onnx-graph"}]
    assert v.gradient_check["graph"]["status"] == "exact" and not v.upper_bound
    assert "GRAPH_GRADIENTS" in {f.code for f in rep.findings}
    only_bb = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, eps=[0.1], n=16,
                                   attacks=["square"], self_checks=False).variants[0]
    assert only_bb.families == ["black-box"]


def test_flat_tabular_model_runs_and_skips_dlr_with_reason(tabular_demo):
    rep = run_robustness_audit([tabular_demo.model_path], tabular_demo.data_path,
                               torch_source=tabular_demo.torch_path, eps=[0.1], n=24,
                               attacks=["fgsm", "apgd-dlr", "square"], self_checks=False)
    runs = {r.attack: r for r in rep.variants[0].attacks}
    assert "3 classes" in runs["apgd-dlr"].skipped
    assert runs["square"].skipped is None


@pytest.mark.parametrize(
    "kwargs, err, msg",
    [
        (dict(eps=[1.5]), InputError, "outside the data range"),
        (dict(eps=[0.0]), InputError, "positive"),
        (dict(eps=[20.0], norm="2"), InputError, "outside the data range"),
        (dict(attacks=["pgd", "cw-l0"]), InputError, "unknown attack"),
        (dict(profile="fast"), InputError, "unknown profile"),
        (dict(norm="1"), InputError, "norm"),
        (dict(n=0), InputError, "positive integer"),
    ],
)
def test_bad_options_are_input_errors(digits_demo, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        run_robustness_audit([digits_demo.model_path], digits_demo.data_path, **kwargs)


def test_model_data_mismatch_is_data_error(digits_demo, tabular_demo):
    with pytest.raises(DataError, match="shape"):
        run_robustness_audit([digits_demo.model_path], tabular_demo.data_path)
    with pytest.raises(ModelError, match="outputs|accept"):
        run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=tabular_demo.torch_path)


def _variant(name, rows, role="white-box"):
    eps = [EpsResult(e, int(r * 100), 100, r, 0, 1, fam) for e, r, fam in rows]
    fams = list(rows[0][2])
    return VariantResult(name, "", "x", role, fams, 1.0, None, eps, [], [], None, False)


def test_parent_check_flags_gradient_only_robustness():
    parent = _variant("float", [(0.1, 0.3, {"white-box": 0.3, "black-box": 0.3})])
    masked = _variant("int8", [(0.1, 0.32, {"bpda": 0.8, "transfer": 0.33, "black-box": 0.32})], "compressed")
    honest = _variant("int8", [(0.1, 0.35, {"bpda": 0.35, "transfer": 0.35, "black-box": 0.35})], "compressed")
    assert [f.code for f in check_against_parent(masked, parent)] == []  # transfer already caught it
    gm = _variant("int8", [(0.1, 0.31, {"bpda": 0.8, "transfer": 0.8, "black-box": 0.31})], "compressed")
    assert [f.code for f in check_against_parent(gm, parent)] == ["COMPRESSED_MASKING"]
    assert check_against_parent(honest, parent) == []


def test_family_gap_check_counts_later_breaks():
    v = _variant("m", [(0.1, 0.5, {"white-box": 0.9, "black-box": 0.5})])
    v.attacks = [AttackRun("pgd", "white-box", 0.1, 100, 10, 0, 0, 0.0),
                 AttackRun("square", "black-box", 0.1, 90, 40, 0, 0, 0.0)]
    assert [f.code for f in check_family_gaps(v)] == ["BLACKBOX_BEATS_WHITEBOX"]
    v.attacks[1].broken = 1
    assert check_family_gaps(v) == []


def test_l2_threat_model(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=digits_demo.torch_path,
                               norm="2", eps=[0.5, 2.0], n=16, attacks=["fgsm", "pgd", "square"], self_checks=False)
    v = rep.variants[0]
    assert rep.norm == "2" and v.eps[1].robust_accuracy <= v.eps[0].robust_accuracy
    for ex in v.examples:
        if ex.broken_at_eps is not None:
            assert ex.norm <= ex.broken_at_eps + 1e-5


@pytest.mark.slow
def test_thorough_profile_runs_every_attack(digits_demo):
    rep = run_robustness_audit([digits_demo.model_path], digits_demo.data_path, torch_source=digits_demo.torch_path,
                               profile="thorough", eps=[0.1], n=24)
    v = rep.variants[0]
    assert {r.attack for r in v.attacks} == {"fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "deepfool", "square", "hsj"}
    assert all(r.skipped is None for r in v.attacks)
    assert not [f for f in rep.findings if f.severity == "high"]
