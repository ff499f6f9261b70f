"""Guarded runner: attackers who know the fitted anomaly gate evade it (``hardening.guarded_audit``);
the float reference only in quick profiles, every variant in thorough ones. Needs the gate
fitted by the OOD runner's first phase; its examples become the OOD audit's adaptive family."""

from __future__ import annotations

from hardening.report.runners.context import AuditContext

AREA = "guarded"
ADAPTIVE_N = {"quick": 32, "thorough": None}  # cap on evaluation points (None: the policy's robustness.n)


def run(ctx: AuditContext) -> None:
    pol = ctx.policy
    cap = ADAPTIVE_N.get(ctx.profile)
    n = pol.robustness.n if cap is None else min(pol.robustness.n, cap)
    for v in ctx.variants:
        if ctx.profile == "quick" and v.name != ctx.reference:
            ctx.adaptive[v.name] = None
            continue
        ctx.steps.say(AREA, f"{v.name}: attacks that know the gate")
        with ctx.stage(AREA, v.name):
            from hardening.guarded_audit import run_guarded_audit  # torch and ART: part of the first stage

            ctx.adaptive[v.name] = run_guarded_audit(
                v.path, ctx.ds, ctx.detectors[v.name], torch_source=v.torch_source, eps=pol.eps, n=n,
                profile=ctx.profile, seed=ctx.seed, progress=lambda m, v=v: ctx.steps.say(AREA, f"{v.name}: {m}"))
