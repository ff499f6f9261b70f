"""Profiling runner: latency, memory, size and accuracy of every variant (``hardening.profiling``)."""

from __future__ import annotations

from hardening.report import summary as S
from hardening.report.runners.context import AuditContext

AREA = "profiling"


def run(ctx: AuditContext) -> None:
    from hardening.executor.usage import measure
    from hardening.profiling import Budgets, profile_variants

    b, pol, steps = ctx.policy.budgets, ctx.policy, ctx.steps
    budgets = Budgets(b.max_latency_p95_ms, b.max_memory_mb, b.max_size_kb, pol.accuracy.min_clean, b.max_cold_start_ms)
    ctx.settings[AREA] = {"threads": 1, "runs": ctx.sizes["profiling_runs"], "big_batch": 32}
    records: dict[str, dict] = {}

    meter = measure()
    with meter:
        def done(name: str) -> None:
            # each variant is measured in a fresh child process; this process waits meanwhile
            records[name] = {"stage": AREA, "variant": name, **meter.split().record()}
            ctx.stages.append(records[name])
            steps.step(AREA, f"profiled {name}")

        rep = profile_variants(ctx.variants, ctx.ds, budgets, threads=1, runs=ctx.sizes["profiling_runs"],
                               big_batch=32, progress=done)
    for p in rep.variants:  # the child's exact peak (its VmHWM), which sampling may have missed
        rec = records[p.name]
        rec["children_peak_rss_mb"] = round(max(rec["children_peak_rss_mb"] or 0.0, p.process_peak_rss_mb), 1)
        rec["peak_rss_mb"] = max(rec["peak_rss_mb"], rec["children_peak_rss_mb"])
        rec["tree_peak_rss_mb"] = round(max(rec["tree_peak_rss_mb"], rec["self_peak_rss_mb"] + rec["children_peak_rss_mb"]), 1)
    ctx.results[AREA] = rep.to_dict()
    S.add_profiling(ctx.summary, ctx.results[AREA])
