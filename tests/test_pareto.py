"""Security-aware Pareto front and ``edgeward select``: the maths on figures chosen by hand, then
hardened variants through the real audits, the report's Pareto section and the choice a policy names."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hardening.cli import app
from hardening.pareto import Candidate, dominates, mark_front, select

runner = CliRunner()


def _cand(name, passed=True, trusted=True, **m):
    base = {"clean_accuracy": 0.95, "robust_accuracy": 0.5, "latency_p95_ms": 1.0, "size_kb": 100.0,
            "memory_mb": 1.0, "queries_to_steal": 1000.0}
    return Candidate(name, "x", "float", name, {**base, **m}, passed, trusted)


def test_dominance_front_and_selection_maths():
    a, b = {"size_kb": 10.0, "robust_accuracy": 0.8}, {"size_kb": 20.0, "robust_accuracy": 0.8}
    assert dominates(a, b) and not dominates(b, a) and not dominates(a, a)
    assert dominates({"size_kb": 10.0}, {"size_kb": None}) and not dominates({"size_kb": None}, {"size_kb": 10.0})
    small = _cand("small", size_kb=50.0, robust_accuracy=0.4)
    robust = _cand("robust", robust_accuracy=0.9)
    worse = _cand("worse", size_kb=120.0, robust_accuracy=0.4)  # dominated by small and robust
    masked = _cand("masked", trusted=False, size_kb=40.0, robust_accuracy=0.99)  # only an upper bound
    cands = [small, robust, worse, masked]
    mark_front(cands)
    assert [c.name for c in cands if c.on_front] == ["small", "robust", "masked"]  # masked: front by size alone
    assert select(cands).name == "small"  # smallest trusted, passing, on the front: never the masked one
    assert select(cands, "robust_accuracy").name == "robust"
    robust.passed = small.passed = False
    assert select(cands) is None
    with pytest.raises(Exception, match="unknown objective"):
        select(cands, "speed")


@pytest.fixture(scope="module")
def reviewed(digits_demo, tmp_path_factory):
    from hardening.harden import harden
    from hardening.report import Policy, run_full_audit
    from hardening.report.policy import EpsThreshold

    hd = tmp_path_factory.mktemp("h")
    harden(digits_demo.model_path, digits_demo.torch_path, digits_demo.data_path, "prune_structured,ptq,adv_distill",
           hd, seed=0)
    p = Policy()
    p.robustness.min_robust_accuracy = [EpsThreshold(0.1, 0.30)]
    p.robustness.n = 48
    p.budgets.max_memory_mb = None
    p.extraction.max_fidelity, p.extraction.min_queries_to_steal = 1.0, 1  # judged here: robustness and size
    p.ood.min_auroc = 0.5
    out = tmp_path_factory.mktemp("review")
    res = run_full_audit(digits_demo.model_path, digits_demo.data_path, out, variants_file=hd / "variants.json",
                         policy=p, areas=("profiling", "robustness", "extraction", "ood"),
                         sizes={"profiling_runs": 20, "ood_synthetic": 100, "extraction_budgets": (50, 200)})
    return res, tmp_path_factory.mktemp("pol")


def by_params(res) -> dict:
    return {v["name"]: v["recipe"].get("parameters") for v in json.loads(res.report_path.read_text())["variants"]}


def _policy(folder, robust: float, clean: float = 0.9) -> str:
    path = folder / f"p_{robust}.toml"
    path.write_text(f"[accuracy]\nmin_clean = {clean}\n[robustness]\nn = 48\n"
                    f"min_robust_accuracy = [{{eps = 0.1, min = {robust}}}]\n[budgets]\nmax_memory_mb = false\n"
                    "[extraction]\nmax_fidelity = 1.0\nmin_queries_to_steal = 1\n[ood]\nmin_auroc = 0.5\n")
    return str(path)


def test_report_has_the_pareto_section_with_parent_deltas(reviewed):
    from hardening.pareto import candidates

    res, _ = reviewed
    html = res.html_path.read_text()
    assert 'id="pareto"' in html and "Pareto front" in html and "data:image/png;base64," in html
    cands, eps = candidates(json.loads(res.report_path.read_text()))
    assert eps == pytest.approx(0.1)
    by = {c.name: c for c in cands}
    assert set(by) == {"float", "prune_structured", "ptq", "adv_distill"}
    for name in ("prune_structured", "ptq", "adv_distill"):  # every candidate, every audit, against its parent
        c = by[name]
        assert c.parent == "float" and c.recipe == name
        for k in ("clean_accuracy", "robust_accuracy", "latency_p95_ms", "size_kb", "queries_to_steal"):
            assert c.metrics[k] is not None, (name, k)
            assert c.delta_vs_parent[k] == pytest.approx(c.metrics[k] - by["float"].metrics[k])
    assert by["ptq"].on_front  # the smallest file is never dominated
    ard = next(v for v in json.loads(res.report_path.read_text())["variants"] if v["name"] == "adv_distill")["recipe"]
    assert ard["eps"] == pytest.approx(0.1) and ard["train_eps"] == pytest.approx(0.2) and ard["pgd_steps"] >= 5
    assert {"temperature", "soft_loss_weight", "hard_loss_weight", "student_kwargs", "pgd_objective"} <= ard.keys()
    assert 2 * ard["parameters"] <= by_params(res)["float"]


def test_select_picks_the_variant_the_policy_names_and_package_takes_it(reviewed, tmp_path):
    res, folder = reviewed
    rep = str(res.report_path)
    doc = json.loads(res.report_path.read_text())
    robust = {c["name"]: c for c in json.loads(runner.invoke(app, ["select", rep, "--json"]).stdout)["candidates"]}
    adv = robust["adv_distill"]["metrics"]["robust_accuracy"]
    others = max(m["metrics"]["robust_accuracy"] for n, m in robust.items() if n != "adv_distill")
    assert adv > others + 0.05, robust  # ARD: the only robust one (measured 0.865 vs <= 0.715 at n=200)
    # "the smallest variant with robust accuracy >= 0.3": the 4-bit-weight QDQ file
    r = runner.invoke(app, ["select", rep, "--policy", _policy(folder, 0.3), "--name-only"])
    assert r.exit_code == 0 and r.stdout.strip() == "ptq", r.output
    # "the smallest with robust accuracy above what the others reach": the ARD student
    thr = round((adv + others) / 2, 3)
    r = runner.invoke(app, ["select", rep, "--policy", _policy(folder, thr), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["selected"] == "adv_distill", r.output
    r = runner.invoke(app, ["select", rep, "--policy", _policy(folder, 0.999)])
    assert r.exit_code == 1 and "no variant satisfies the policy" in r.output, r.output
    assert runner.invoke(app, ["select", rep, "--best", "speed"]).exit_code == 2
    assert doc["verdict"]["variants"]  # the report's own policy judged every variant
    # package takes the selected variant (the report's own policy: robust >= 0.3)
    name = runner.invoke(app, ["select", rep, "--name-only"]).stdout.strip()
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keygen", "--out", str(keys)]).exit_code == 0
    r = runner.invoke(app, ["package", rep, "--variant", name, "--out", str(tmp_path / "m.ewb"), "--signing-key",
                            str(keys / "signing.pem"), "--key-file", str(keys / "kek.key"), "--version", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["variant"] == name
