"""Robustness runner: the worst-case evasion audit of every variant, sharded on the audit's executor."""

from __future__ import annotations

from hardening.report import summary as S
from hardening.report.runners.context import AuditContext, shard_peak, share_record

AREA = "robustness"


def run(ctx: AuditContext) -> None:
    from hardening.robustness import run_robustness_audit

    pol, steps = ctx.policy, ctx.steps
    cap = ctx.sizes["robustness_n_cap"]
    n = pol.robustness.n if cap is None else min(pol.robustness.n, cap)
    rs = {"profile": ctx.profile, "eps": pol.eps, "norm": pol.robustness.norm, "n": n, "seed": ctx.seed}
    ctx.settings[AREA] = rs
    base = steps.done

    def rprog(msg: str, done: int, total: int) -> None:
        # each variant's cascade ends with "<variant> done": one overall step per variant
        (steps.step if msg.endswith(" done") else steps.say)(AREA, msg)

    with ctx.stage(AREA) as rec:
        rep = run_robustness_audit(ctx.variants, ctx.ds, torch_source=ctx.torch_source, progress=rprog,
                                   executor=ctx.executor, checkpoint_dir=ctx.out, resume=ctx.resume, **rs)
        rec["peak_rss_mb"] = shard_peak(rep.execution.get("shards", []))
    steps.done = max(steps.done, base + len(ctx.variants))
    ctx.results[AREA] = rep.to_dict()
    S.add_robustness(ctx.summary, ctx.results[AREA])
    for v in ctx.variants:  # the variants ran together: each one's share is its shards' compute
        mine = [s for s in rep.execution.get("shards", []) if s["label"].startswith(f"{v.name} ")]
        ctx.stages.append(share_record(ctx, AREA, v.name, mine))
