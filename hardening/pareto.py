"""The security-aware Pareto front over a report's variants, each one's change against its
parent, and the policy-driven choice of the variant to deploy (``edgeward select``).

Reads only a ``report.json`` (its normalised ``summary``, ``variants`` and ``verdict``), so it
judges a fresh audit and an old report alike. Pure maths, no I/O beyond the caller's dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hardening.errors import InputError

# name -> (higher is better?, label). Robust accuracy is at the policy's first epsilon; queries
# to steal is the extraction audit's proven lower bound (``queries_survived``).
OBJECTIVES: dict[str, tuple[bool, str]] = {
    "clean_accuracy": (True, "clean accuracy"),
    "robust_accuracy": (True, "robust accuracy"),
    "latency_p95_ms": (False, "p95 latency (ms)"),
    "size_kb": (False, "size (KiB)"),
    "memory_mb": (False, "memory (MB)"),
    "queries_to_steal": (True, "queries to steal (lower bound)"),
}


@dataclass
class Candidate:
    name: str
    kind: str
    parent: str | None
    recipe: str | None
    metrics: dict[str, float | None]
    passed: bool  # every policy check of this variant passed (the report's verdict)
    robust_trusted: bool  # no upper-bound / masking flag on its robust figure
    on_front: bool = False
    delta_vs_parent: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _robust_at(s: dict, eps: float | None) -> float | None:
    pts = s.get("robust_accuracy") or []
    if not pts:
        return None
    if eps is None:
        return float(pts[0]["robust_accuracy"])
    hit = [p for p in pts if abs(p["eps"] - eps) <= 1e-9]
    return float(hit[0]["robust_accuracy"]) if hit else None


def candidates(report: dict) -> tuple[list[Candidate], float | None]:
    """Every variant of the report with its objective figures; returns (candidates, eps used)."""
    pol = report["settings"]["policy"]["robustness"]
    thresholds = pol.get("min_robust_accuracy") or []
    eps = float(thresholds[0]["eps"]) if thresholds else None
    sv = report["summary"]["variants"]
    verdict = report["verdict"].get("variants", {})
    out = []
    for v in report["variants"]:
        s = sv[v["name"]]
        ex = s.get("extraction") or {}
        m = {"clean_accuracy": s.get("clean_accuracy"), "robust_accuracy": _robust_at(s, eps),
             "latency_p95_ms": s.get("latency_p95_ms"), "size_kb": s.get("size_kb"), "memory_mb": s.get("memory_mb"),
             "queries_to_steal": ex.get("queries_survived")}
        trusted = not s.get("robust_upper_bound") and not s.get("robustness_high_findings")
        out.append(Candidate(v["name"], v["kind"], v.get("parent"), (v.get("recipe") or {}).get("recipe"), m,
                             bool(verdict.get(v["name"], False)), trusted))
    by = {c.name: c for c in out}
    for c in out:
        p = by.get(c.parent) if c.parent else None
        if p is not None:
            c.delta_vs_parent = {k: None if c.metrics[k] is None or p.metrics[k] is None else c.metrics[k] - p.metrics[k]
                                 for k in OBJECTIVES}
    mark_front(out)
    return out, eps


def dominates(a: dict, b: dict, keys=tuple(OBJECTIVES)) -> bool:
    """``a`` is at least as good as ``b`` on every objective both have and better on one.
    A missing figure is never better than a measured one."""
    better = False
    for k in keys:
        hi = OBJECTIVES[k][0]
        x, y = a.get(k), b.get(k)
        if x is None and y is None:
            continue
        if x is None:
            return False
        if y is None:
            better = True
            continue
        if (x < y) if hi else (x > y):
            return False
        if x != y:
            better = True
    return better


def mark_front(cands: list[Candidate]) -> None:
    """``on_front`` for the variants no other variant dominates. A robust figure that is only an
    upper bound (masking suspected) cannot put a variant on the front: it counts as unmeasured."""
    eff = [{**c.metrics, **({} if c.robust_trusted else {"robust_accuracy": None})} for c in cands]
    for i, c in enumerate(cands):
        c.on_front = not any(dominates(eff[j], eff[i]) for j in range(len(cands)) if j != i)


def _score(c: Candidate, k: str) -> float:
    """Lower is better; an unmeasured figure ranks last."""
    v = c.metrics.get(k)
    if v is None:
        return float("inf")
    return -float(v) if OBJECTIVES[k][0] else float(v)


def select(cands: list[Candidate], best: str = "size_kb") -> Candidate | None:
    """The deployable variant: passes the policy, robust figure trusted, on the front; best on
    ``best`` (smallest size by default; highest for accuracy-like objectives), ties broken by the
    other objectives in ``OBJECTIVES`` order, then by name. None when no variant qualifies."""
    if best not in OBJECTIVES:
        raise InputError(f"unknown objective {best!r}; choose from {', '.join(OBJECTIVES)}")
    ok = [c for c in cands if c.passed and c.robust_trusted and c.on_front and c.metrics.get(best) is not None]
    if not ok:
        return None
    return min(ok, key=lambda c: (_score(c, best), *(_score(c, k) for k in OBJECTIVES if k != best), c.name))
