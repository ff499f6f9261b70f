"""Policy checks: one named pass/fail/skip result per threshold per variant.

Checks read only the report's normalised ``summary`` (see ``docs/report-schema.md``),
so the same code judges a fresh audit and an old ``report.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hardening.report.policy import Policy

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class Check:
    id: str  # stable: "<variant>/<area>/<metric>[@eps|family]"
    area: str  # accuracy | robustness | extraction | ood | budgets
    variant: str | None
    metric: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    status: str  # pass | fail | skip
    message: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _cmp(
    out: list[Check], variant: str, area: str, metric: str, value, op: str, thr: float, label: str,
    fmt=_pct, suffix: str = "", why_skipped: str = "not measured",
) -> None:
    cid = f"{variant}/{area}/{metric}{suffix}"
    if value is None:
        out.append(Check(cid, area, variant, metric, None, op, thr, SKIP, f"{variant}: {label} {why_skipped}"))
        return
    ok = value >= thr if op == ">=" else value <= thr
    word = "meets" if ok else ("below" if op == ">=" else "above")
    msg = f"{variant} variant: {label} is {fmt(value)}, {word} policy {fmt(thr)}"
    out.append(Check(cid, area, variant, metric, float(value), op, float(thr), PASS if ok else FAIL, msg))


def evaluate_policy(summary: dict, policy: Policy, ran: dict[str, bool]) -> list[Check]:
    """Every policy threshold applied to every variant in ``summary['variants']``.

    ``ran`` says which areas were audited; checks of an area that did not run are
    ``skip`` (visible in JUnit as skipped), never silently passed.
    """
    out: list[Check] = []
    float_acc = summary.get("reference_clean_accuracy")
    for name, s in summary["variants"].items():
        a = policy.accuracy
        _cmp(out, name, "accuracy", "clean_accuracy", s.get("clean_accuracy"), ">=", a.min_clean, "clean accuracy")
        if s.get("kind") != "float" and float_acc is not None and s.get("clean_accuracy") is not None:
            drop = float_acc - s["clean_accuracy"]
            _cmp(out, name, "accuracy", "accuracy_drop_vs_float", drop, "<=", a.max_drop_vs_float,
                 "clean accuracy drop vs float")

        skip = "not measured (robustness audit not run)" if not ran.get("robustness") else "not measured"
        robust = {round(r["eps"], 9): r["robust_accuracy"] for r in s.get("robust_accuracy") or []}
        for t in policy.robustness.min_robust_accuracy:
            value = robust.get(round(t.eps, 9))
            if value is not None and s.get("robust_upper_bound"):
                # a masked model cannot pass: its figure is only what our attacks failed to break
                out.append(Check(f"{name}/robustness/robust_accuracy@{t.eps:g}", "robustness", name,
                                 "robust_accuracy", float(value), ">=", float(t.min), FAIL,
                                 f"{name} variant: robust accuracy at eps {t.eps:g} is {_pct(value)}, an unreliable "
                                 f"upper bound ({s.get('robust_upper_bound_reason') or 'gradient masking'})"))
                continue
            _cmp(out, name, "robustness", "robust_accuracy", value, ">=", t.min,
                 f"robust accuracy at eps {t.eps:g}", suffix=f"@{t.eps:g}", why_skipped=skip)
        if policy.robustness.fail_on_high_findings and ran.get("robustness"):
            high = s.get("robustness_high_findings", [])
            cid = f"{name}/robustness/self_checks"
            if high:
                out.append(Check(cid, "robustness", name, "high_findings", float(len(high)), "<=", 0.0, FAIL,
                                 f"{name} variant: robustness self-checks raised {len(high)} high finding(s) "
                                 f"({', '.join(sorted(set(high)))}); the robust accuracy may be overestimated"))
            else:
                out.append(Check(cid, "robustness", name, "high_findings", 0.0, "<=", 0.0, PASS,
                                 f"{name} variant: robustness self-checks found no sign of gradient masking"))

        e, ex = policy.extraction, s.get("extraction") or {}
        skip = "not measured (extraction audit not run)" if not ran.get("extraction") else "not measured"
        _cmp(out, name, "extraction", "fidelity_at_budget", ex.get("fidelity_at_budget"), "<=", e.max_fidelity,
             f"stolen-copy fidelity at {e.budget} queries", why_skipped=skip)
        # judged on what the budgets prove: the largest budget at which the copy was still below target
        survived = ex.get("queries_survived")
        label = (f"stolen to {e.target_fidelity:.0%} fidelity within <= {ex.get('queries_to_steal') or 0:.0f} queries "
                 "(the smallest budget tried); queries a thief provably needs"
                 if ex.get("steal_bound") == "at_most" else
                 f"queries a thief provably needs to reach {e.target_fidelity:.0%} fidelity")
        _cmp(out, name, "extraction", "queries_to_steal", survived, ">=", e.min_queries_to_steal,
             label, fmt=lambda v: f"{v:.0f}", why_skipped=skip)

        o, od = policy.ood, s.get("ood") or {}
        skip = "not measured (OOD audit not run)" if not ran.get("ood") else "not measured"
        fams = policy.ood.families or sorted((od.get("auroc") or {}).keys())
        if not fams:
            _cmp(out, name, "ood", "auroc", None, ">=", o.min_auroc, "OOD AUROC", fmt=lambda v: f"{v:.3f}",
                 why_skipped=skip)
        for fam in fams:
            _cmp(out, name, "ood", "auroc", (od.get("auroc") or {}).get(fam), ">=", o.min_auroc,
                 f"OOD AUROC on '{fam}'", fmt=lambda v: f"{v:.3f}", suffix=f"@{fam}", why_skipped=skip)
        _cmp(out, name, "ood", "id_false_rejection", od.get("id_frr"), "<=", o.max_id_frr,
             "in-distribution false-rejection rate", why_skipped=skip)

        b = policy.budgets
        for metric, limit, label, unit in (
            ("latency_p95_ms", b.max_latency_p95_ms, "p95 latency (batch 1)", "ms"),
            ("memory_mb", b.max_memory_mb, "memory added", "MB"),
            ("size_kb", b.max_size_kb, "model size", "KiB"),
            ("cold_start_ms", b.max_cold_start_ms, "cold start", "ms"),
        ):
            if limit is not None:
                _cmp(out, name, "budgets", metric, s.get(metric), "<=", limit, label,
                     fmt=lambda v, u=unit: f"{v:.3g} {u}")
    return out
