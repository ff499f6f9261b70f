"""Extraction runner: an attacker with in-distribution data steals each variant (undefended
outputs and the policy's victim) at budgets bracketing the policy budget."""

from __future__ import annotations

from hardening.report import summary as S
from hardening.report.policy import Policy
from hardening.report.runners.context import AuditContext

AREA = "extraction"


def run(ctx: AuditContext) -> None:
    pol, steps = ctx.policy, ctx.steps
    try:
        from hardening.extraction_audit import run_extraction_audit
    except ImportError:
        for _ in ctx.variants:
            steps.step(AREA, "extraction audit not available")
        ctx.results[AREA], ctx.settings[AREA] = None, {"available": False}
        ctx.findings.append({
            "severity": "warning", "area": AREA, "variant": None, "code": "EXTRACTION_UNAVAILABLE",
            "message": "extraction audit module (hardening.extraction_audit) is not installed; extraction checks skipped"})
        return
    kw = extraction_kwargs(pol, ctx.profile, ctx.seed, ctx.sizes["extraction_budgets"])
    out: dict = {"variants": {}}
    # workers rebuild the victims from files; in-process the loaded arrays are used as always
    data = ctx.data if ctx.remote else ctx.ds
    for v in ctx.variants:
        steps.say(AREA, f"{v.name}: stealing")
        with ctx.stage(AREA, v.name):
            rep = run_extraction_audit(v.path, data, torch_source=ctx.torch_source or v.torch_source, **kw,
                                       executor=ctx.executor, checkpoint_dir=ctx.out, resume=ctx.resume,
                                       progress=lambda d, t, m, v=v: steps.say(AREA, f"{v.name}: {m} ({d}/{t})"))
        d = rep.to_dict()
        out["variants"][v.name] = d
        sc = d.get("self_check") or {}
        if sc and not sc.get("passed", True):
            ctx.findings.append({
                "severity": "high", "area": AREA, "variant": v.name, "code": "EXTRACTION_SELF_CHECK",
                "message": f"{v.name}: extraction harness self-check failed ({sc.get('message')}); "
                           "extraction figures understate the risk"})
        steps.step(AREA, f"{v.name} done")
    ctx.results[AREA], ctx.settings[AREA] = out, {**kw, "budgets": list(kw["budgets"])}
    if ctx.profile != "quick":
        _adaptive_thieves(ctx)
    for name, ext in out["variants"].items():
        curve, attack = S.worst_extraction_curve(ext, pol.extraction.victim)
        ctx.summary[name]["extraction"] = S.extraction_figures(curve, pol.extraction.budget,
                                                               pol.extraction.target_fidelity, attack)


def _adaptive_thieves(ctx: AuditContext) -> None:
    """Thorough reviews: thieves that adapt to the guard (mixup of real seeds, active
    learning, JBDA, data-free; plain and gate-aware) against every defence, on the reference
    variant; the report's defence table reads it. About a minute on the digits demo, which
    is why quick reviews leave it out (their table says so)."""
    from hardening.thief_matrix import run_thief_matrix

    ref = next(v for v in ctx.variants if v.name == ctx.reference)
    ctx.steps.say(AREA, f"{ref.name}: adaptive thieves x defences")
    with ctx.stage("adaptive-extraction", ref.name):
        ctx.summary[ref.name]["adaptive_extraction"] = run_thief_matrix(
            ref.path, ctx.ds, torch_source=ctx.torch_source or ref.torch_source, profile="quick", seed=ctx.seed)


def extraction_kwargs(policy: Policy, profile: str, seed: int, budgets=None) -> dict:
    from hardening.extraction_audit import DEFAULT_BUDGETS, QUICK_BUDGETS

    grid = budgets or (QUICK_BUDGETS if profile == "quick" else DEFAULT_BUDGETS)
    budgets = sorted({*grid, policy.extraction.budget, policy.extraction.min_queries_to_steal})
    return {
        "budgets": tuple(budgets),
        "scenarios": ("in_dist",) if profile == "quick" else ("in_dist", "natural_ood", "noise"),
        "policies": tuple(dict.fromkeys(("bare", policy.extraction.victim))),
        "attacks": ("knockoff_random",) if profile == "quick" else ("copycat", "knockoff_random"),
        "train_steps": 150 if profile == "quick" else 300,
        "seed": seed,
    }
