"""Normalise each area's raw result (its own ``to_dict()``) into the per-variant figures
that policy checks, the gate and the HTML read (``summary.variants[<name>]``).

Raw results stay in ``results.<area>`` untouched; only this module knows their shapes.
"""

from __future__ import annotations

from typing import Any


def empty_variant(kind: str) -> dict:
    return {
        "kind": kind,
        "clean_accuracy": None,
        "agreement_with_float": None,
        "robust_accuracy": [],
        "robustness_high_findings": [],
        "robust_upper_bound": False,
        "robust_upper_bound_reason": None,
        "output_convention": None,
        "extraction": None,
        "ood": None,
        "latency_p95_ms": None,
        "memory_mb": None,
        "size_kb": None,
        "cold_start_ms": None,
    }


def add_profiling(summary: dict, prof: dict) -> None:
    for p in prof["variants"]:
        s = summary[p["name"]]
        s["clean_accuracy"] = p["accuracy"]
        s["agreement_with_float"] = p["agreement_with_float"]
        s["latency_p95_ms"] = p["latency"][0]["p95_ms"]
        s["memory_mb"] = p["memory_added_mb"]
        s["size_kb"] = p["size_bytes"] / 1024
        s["cold_start_ms"] = p["cold_start_ms"]


def add_robustness(summary: dict, rob: dict) -> None:
    for v in rob["variants"]:
        s = summary[v["name"]]
        s["robust_accuracy"] = [
            {"eps": e["eps"], "robust_accuracy": e["robust_accuracy"], "ci_low": e["ci_low"], "ci_high": e["ci_high"], "n": e["n"]}
            for e in v["eps"]
        ]
        if s["clean_accuracy"] is None:
            s["clean_accuracy"] = v["clean_accuracy"]
        s["robust_upper_bound"] = bool(v.get("upper_bound", False))
        s["robust_upper_bound_reason"] = v.get("upper_bound_reason")
        s["output_convention"] = v.get("output_convention")
    for f in rob["findings"]:
        if f["severity"] == "high" and f.get("variant") in summary:
            summary[f["variant"]]["robustness_high_findings"].append(f["code"])


def _curve(points: list[tuple[float, float]]) -> list[dict]:
    return [{"queries": float(q), "fidelity": float(f)} for q, f in sorted(points)]


def extraction_figures(curve: list[dict], budget: int, target: float, attack: str | None) -> dict:
    """Fidelity at the policy budget (linear between measured budgets; the last point holds
    beyond the largest budget tried) and what the measured budgets prove about the queries
    needed to reach ``target``: ``queries_to_steal`` is the first budget that reached it (an
    upper bound), ``queries_survived`` the largest budget below it that did not (a proven
    lower bound; 0 when the smallest budget already reached it, so it is only "<= smallest").
    Checks judge the lower bound: a copy stolen within the budgets tried is never a pass."""
    if not curve:
        return {"budget": budget, "fidelity_at_budget": None, "queries_to_steal": None, "max_queries": None,
                "queries_survived": None, "steal_bound": None, "attack": attack, "curve": []}
    qs = [c["queries"] for c in curve]
    fs = [c["fidelity"] for c in curve]
    if budget <= qs[0]:
        at = fs[0] if budget == qs[0] else None  # below the smallest budget measured: unknown
    elif budget >= qs[-1]:
        at = fs[-1] if budget == qs[-1] else None  # beyond the largest measured budget: unknown
    else:
        i = next(i for i, q in enumerate(qs) if q >= budget)
        w = (budget - qs[i - 1]) / (qs[i] - qs[i - 1])
        at = fs[i - 1] + w * (fs[i] - fs[i - 1])
    first = next((i for i, f in enumerate(fs) if f >= target), None)
    steal = None if first is None else qs[first]
    survived = qs[-1] if first is None else (qs[first - 1] if first > 0 else 0.0)
    bound = "not_reached" if first is None else ("at_most" if first == 0 else "between")
    return {"budget": budget, "fidelity_at_budget": at, "queries_to_steal": steal, "max_queries": qs[-1],
            "queries_survived": survived, "steal_bound": bound, "attack": attack, "curve": curve}


def worst_extraction_curve(ext: dict, victim: str = "bare") -> tuple[list[dict], str | None]:
    """The strongest attacker's fidelity-vs-queries curve from an extraction report dict.

    Reads the unguarded ("full" output policy) scenario when policies were compared, and
    takes for each budget the best fidelity any attack reached (the attacker picks).
    """
    runs = _extraction_runs(ext, victim)
    if not runs:
        return [], None
    best: dict[float, tuple[float, str]] = {}
    for r in runs:
        q, f, a = r["queries"], r["fidelity"], r.get("attack")
        if q not in best or f > best[q][0]:
            best[q] = (f, a)
    pts = sorted(best.items())
    strongest = max(pts, key=lambda kv: kv[1][0])[1][1]
    return _curve([(q, fa[0]) for q, fa in pts]), strongest


def _extraction_runs(ext: dict, victim: str = "bare") -> list[dict]:
    """Flatten to {"queries", "fidelity", "attack", "victim"} rows of the victim the policy
    judges (default "bare": the raw model's outputs)."""
    rows: list[dict[str, Any]] = []
    for key in ("runs", "results", "points"):
        if isinstance(ext.get(key), list):
            for r in ext[key]:
                q = r.get("queries", r.get("budget"))
                f = r.get("fidelity", r.get("agreement"))
                if q is None or f is None:
                    continue
                rows.append({"queries": float(q), "fidelity": float(f), "attack": r.get("attack"),
                             "victim": r.get("victim", "bare"), "scenario": r.get("scenario")})
            break
    if not rows:
        return rows
    victims = {r["victim"] for r in rows}
    keep = next((v for v in (victim, "bare", "full") if v in victims), sorted(victims, key=str)[0])
    return [r for r in rows if r["victim"] == keep]


# OOD family of the accepted misclassifications the gate-aware attacks found. Accepted by
# construction, so its AUROC is shown (``adaptive_auroc``) but kept out of ``min_auroc``:
# what the gate stops of adaptive evasion is ``guarded_robust_accuracy``.
ADAPTIVE_FAMILY = "adaptive_eps"


def add_ood(summary: dict, name: str, audit: dict, detector: str = "ensemble") -> None:
    every = {m["family"]: m["auroc"] for m in audit["metrics"] if m["detector"] == detector}
    auroc = {f: a for f, a in every.items() if not f.startswith(ADAPTIVE_FAMILY)}
    summary[name]["ood"] = {
        "auroc": auroc,
        "adaptive_auroc": {f: a for f, a in every.items() if f.startswith(ADAPTIVE_FAMILY)},
        "min_auroc": min(auroc.values()) if auroc else None,
        "id_frr": audit["id_frr"].get(detector),
        "threshold": audit.get("threshold"),
    }
    g = audit.get("adaptive_evasion")
    if g:
        summary[name]["guarded_robust_accuracy"] = [
            {"eps": e["eps"], "guarded_robust_accuracy": e["guarded_robust_accuracy"],
             "bare_robust_accuracy": e["bare_robust_accuracy"],
             "non_adaptive_guarded_accuracy": e["non_adaptive_guarded_accuracy"], "n": g["n"],
             "attackers": g["attackers"], "white_box_skipped": g["white_box_skipped"]}
            for e in g["result"]["eps"]]
