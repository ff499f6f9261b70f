"""``edgeward gate``: compare a report with a baseline and fail on regressions beyond tolerance.

Only the normalised ``summary`` is compared, variant by variant (matched by name).
Directions: accuracy, robust accuracy, AUROC and queries-to-steal must not fall;
extraction fidelity at the budget, latency and size must not grow. Absolute
tolerances for fractions, relative ones for queries, latency and size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hardening.report.policy import GatePolicy
from hardening.report.schema import ReportError, major

OK, REGRESSION, IMPROVED, NEW, GONE = "ok", "regression", "improved", "new", "missing"


@dataclass
class Change:
    variant: str
    metric: str
    baseline: float | None
    current: float | None
    delta: float | None  # current - baseline (relative for relative metrics)
    relative: bool
    tolerance: float
    status: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateResult:
    changes: list[Change]
    failed_checks: list[dict] = field(default_factory=list)  # the current report's own policy failures
    tolerances: dict = field(default_factory=dict)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.status == REGRESSION]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.failed_checks

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "regressions": len(self.regressions),
            "failed_checks": self.failed_checks,
            "tolerances": self.tolerances,
            "changes": [c.to_dict() for c in self.changes],
        }


def _cmp(out: list[Change], variant: str, metric: str, b, c, *, higher_better: bool, relative: bool, tol: float,
         label: str, fmt) -> None:
    if b is None and c is None:
        return
    if b is None or c is None:
        st = NEW if b is None else GONE
        out.append(Change(variant, metric, b, c, None, relative, tol, st if b is None else REGRESSION,
                          f"{variant}: {label} was {fmt(b)}, now {fmt(c)}" + ("" if b is None else " (no longer measured)")))
        return
    if relative:
        delta = (c - b) / b if b else (0.0 if c == b else float("inf"))
    else:
        delta = c - b
    worse = -delta if higher_better else delta  # > 0 means worse
    if worse > tol + 1e-12:
        st = REGRESSION
    elif worse < -max(tol, 1e-12):
        st = IMPROVED
    else:
        st = OK
    how = f"{delta:+.1%}" if relative else f"{delta:+.3f}"
    out.append(Change(variant, metric, float(b), float(c), float(delta), relative, tol, st,
                      f"{variant}: {label} {fmt(b)} -> {fmt(c)} ({how}; tolerance {tol:.0%}{' relative' if relative else ''})"))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _queries(ex: dict) -> float | None:
    """Queries-to-steal; when never stolen, the largest budget tried (a lower bound)."""
    if ex.get("queries_to_steal") is not None:
        return float(ex["queries_to_steal"])
    return None if ex.get("max_queries") is None else float(ex["max_queries"])


def compare_reports(current: dict, baseline: dict, tolerances: GatePolicy | None = None) -> GateResult:
    """Both reports must already be schema-valid (``schema.load_report``)."""
    if major(current["schema_version"]) != major(baseline["schema_version"]):
        raise ReportError(
            f"reports have different schema major versions ({current['schema_version']} vs baseline "
            f"{baseline['schema_version']}); re-run the baseline audit with this edgeward"
        )
    tol = tolerances or GatePolicy(**current["settings"]["policy"]["gate"])
    cur, base = current["summary"]["variants"], baseline["summary"]["variants"]
    out: list[Change] = []
    for name in base:
        if name not in cur:
            out.append(Change(name, "variant", None, None, None, False, 0.0, GONE,
                              f"{name}: variant is in the baseline but not in this report"))
    for name, c in cur.items():
        b = base.get(name)
        if b is None:
            out.append(Change(name, "variant", None, None, None, False, 0.0, NEW, f"{name}: new variant (no baseline)"))
            continue
        _cmp(out, name, "clean_accuracy", b.get("clean_accuracy"), c.get("clean_accuracy"), higher_better=True,
             relative=False, tol=tol.max_clean_accuracy_drop, label="clean accuracy", fmt=_pct)
        br = {round(p["eps"], 9): p["robust_accuracy"] for p in b.get("robust_accuracy") or []}
        cr = {round(p["eps"], 9): p["robust_accuracy"] for p in c.get("robust_accuracy") or []}
        for eps in sorted(set(br) | set(cr)):
            _cmp(out, name, f"robust_accuracy@{eps:g}", br.get(eps), cr.get(eps), higher_better=True, relative=False,
                 tol=tol.max_robust_accuracy_drop, label=f"robust accuracy at eps {eps:g}", fmt=_pct)
        ba, ca = (b.get("ood") or {}).get("auroc") or {}, (c.get("ood") or {}).get("auroc") or {}
        for fam in sorted(set(ba) | set(ca)):
            _cmp(out, name, f"ood_auroc@{fam}", ba.get(fam), ca.get(fam), higher_better=True, relative=False,
                 tol=tol.max_auroc_drop, label=f"OOD AUROC on '{fam}'", fmt=_num)
        be, ce = b.get("extraction") or {}, c.get("extraction") or {}
        if be or ce:
            _cmp(out, name, "extraction_fidelity_at_budget", be.get("fidelity_at_budget"), ce.get("fidelity_at_budget"),
                 higher_better=False, relative=False, tol=tol.max_extraction_fidelity_rise,
                 label=f"stolen-copy fidelity at {ce.get('budget', be.get('budget'))} queries", fmt=_pct)
            _cmp(out, name, "extraction_queries_to_steal", _queries(be), _queries(ce), higher_better=True, relative=True,
                 tol=tol.max_extraction_cheaper, label="queries to steal", fmt=_num)
        _cmp(out, name, "latency_p95_ms", b.get("latency_p95_ms"), c.get("latency_p95_ms"), higher_better=False,
             relative=True, tol=tol.max_latency_growth, label="p95 latency (ms)", fmt=_num)
        _cmp(out, name, "size_kb", b.get("size_kb"), c.get("size_kb"), higher_better=False, relative=True,
             tol=tol.max_size_growth, label="model size (KiB)", fmt=_num)
    failed = [ch for ch in current["checks"] if ch["status"] == "fail"]
    return GateResult(out, failed, asdict(tol))
