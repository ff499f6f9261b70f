"""``edgeward gate``: a deliberately weakened model regresses against its baseline; identical
reports pass; bad or incompatible reports are input errors (exit 2).

Both reports come from the real pipeline at reduced size (float variant only, 16 points).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hardening.cli import app
from hardening.report import Policy, compare_reports, load_report, run_full_audit
from hardening.report.policy import EpsThreshold

runner = CliRunner()
AREAS = ("profiling", "robustness", "ood")
SIZES = {"profiling_runs": 20, "ood_synthetic": 100}


def _policy() -> Policy:
    p = Policy()
    p.robustness.min_robust_accuracy = [EpsThreshold(0.1, 0.0)]
    p.robustness.n = 16
    p.accuracy.min_clean = 0.0
    p.ood.min_auroc = 0.0
    p.ood.max_id_frr = 1.0
    p.budgets.max_memory_mb = p.budgets.max_latency_p95_ms = None
    return p


def _audit(demo, out):
    return run_full_audit(demo.model_path, demo.data_path, out, torch_source=demo.torch_path, kinds=("float",),
                          policy=_policy(), areas=AREAS, sizes=SIZES).report_path


@pytest.fixture(scope="module")
def reports(digits_demo, tmp_path_factory):
    from hardening.demo import build_demo

    weak = build_demo("digits", tmp_path_factory.mktemp("weak"), epochs=2)
    base = _audit(digits_demo, tmp_path_factory.mktemp("base"))
    cand = _audit(weak, tmp_path_factory.mktemp("cand"))
    return base, cand


def test_identical_reports_pass(reports):
    base, _ = reports
    r = runner.invoke(app, ["gate", str(base), "--baseline", str(base)])
    assert r.exit_code == 0, r.output
    assert "PASS: 0 regression(s)" in r.output


def test_weakened_model_fails_with_the_regression_named(reports):
    base, cand = reports
    b, c = load_report(base), load_report(cand)
    # the weak model really is weaker (otherwise this test could not fail for the right reason)
    assert c["summary"]["variants"]["float"]["clean_accuracy"] < b["summary"]["variants"]["float"]["clean_accuracy"] - 0.02
    res = compare_reports(c, b)
    names = {ch.metric for ch in res.regressions}
    assert "clean_accuracy" in names
    r = runner.invoke(app, ["gate", str(cand), "--baseline", str(base)])
    assert r.exit_code == 1, r.output
    assert "REGRESSION float: clean accuracy" in r.output
    r = runner.invoke(app, ["gate", str(cand), "--baseline", str(base), "--json"])
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["passed"] is False and d["regressions"] >= 1
    assert any(ch["metric"] == "clean_accuracy" and ch["status"] == "regression" for ch in d["changes"])


def test_tolerances_come_from_policy(reports, tmp_path):
    base, cand = reports
    loose = tmp_path / "loose.toml"
    loose.write_text("[gate]\nmax_clean_accuracy_drop = 1.0\nmax_robust_accuracy_drop = 1.0\nmax_auroc_drop = 1.0\n"
                     "max_latency_growth = 100.0\nmax_size_growth = 100.0\n")
    r = runner.invoke(app, ["gate", str(cand), "--baseline", str(base), "--policy", str(loose)])
    assert r.exit_code == 0, r.output


def test_regression_directions(reports):
    base, _ = reports
    b = load_report(base)
    c = json.loads(json.dumps(b))
    v = c["summary"]["variants"]["float"]
    v["robust_accuracy"][0]["robust_accuracy"] = max(0.0, v["robust_accuracy"][0]["robust_accuracy"] - 0.2)
    v["size_kb"] *= 1.5
    v["ood"]["auroc"]["heldout"] -= 0.1
    v["extraction"] = {"budget": 200, "fidelity_at_budget": 0.99, "queries_to_steal": 50.0, "max_queries": 500.0,
                       "attack": "copycat", "curve": []}
    b["summary"]["variants"]["float"]["extraction"] = dict(v["extraction"], fidelity_at_budget=0.8, queries_to_steal=500.0)
    bad = {ch.metric for ch in compare_reports(c, b).regressions}
    assert {"robust_accuracy@0.1", "size_kb", "ood_auroc@heldout", "extraction_fidelity_at_budget",
            "extraction_queries_to_steal"} <= bad
    # improvements are not regressions
    assert not compare_reports(b, c).regressions or all(
        ch.metric not in ("robust_accuracy@0.1", "size_kb", "ood_auroc@heldout") for ch in compare_reports(b, c).regressions)


def test_bad_inputs_exit_2(reports, tmp_path):
    base, _ = reports
    doc = json.loads(base.read_text())
    cases = {
        "not json": ("{oops", "not valid JSON"),
        "schema-invalid": (json.dumps({**doc, "checks": "nope"}), "schema-invalid report at checks"),
        "other major": (json.dumps({**doc, "schema_version": "2.0"}), "schema version 2.0"),
    }
    for name, (text, msg) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(text)
        r = runner.invoke(app, ["gate", str(f), "--baseline", str(base)])
        assert r.exit_code == 2, (name, r.output)
        assert msg in r.output, (name, r.output)
    r = runner.invoke(app, ["gate", str(tmp_path / "missing.json"), "--baseline", str(base)])
    assert r.exit_code == 2 and "cannot read report" in r.output


def test_failed_policy_check_fails_the_gate(reports, tmp_path):
    from hardening.report import rejudge

    base, _ = reports
    p = _policy()
    p.accuracy.min_clean = 0.999
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps(rejudge(load_report(base), p)))
    r = runner.invoke(app, ["gate", str(failing), "--baseline", str(base)])
    assert r.exit_code == 1 and "FAILED CHECK float variant: clean accuracy" in r.output
    r = runner.invoke(app, ["gate", str(failing), "--baseline", str(base), "--regressions-only"])
    assert r.exit_code == 0, r.output
