"""Profiling runner: latency, memory, size and accuracy of every variant (``hardening.profiling``)."""

from __future__ import annotations

import time

from hardening.report import summary as S
from hardening.report.runners.context import AuditContext

AREA = "profiling"


def run(ctx: AuditContext) -> None:
    from hardening.profiling import Budgets, profile_variants

    b, pol, steps = ctx.policy.budgets, ctx.policy, ctx.steps
    budgets = Budgets(b.max_latency_p95_ms, b.max_memory_mb, b.max_size_kb, pol.accuracy.min_clean, b.max_cold_start_ms)
    ctx.settings[AREA] = {"threads": 1, "runs": ctx.sizes["profiling_runs"], "big_batch": 32}
    last = [time.perf_counter()]

    def done(name: str) -> None:
        # each variant is measured in a fresh child process: its memory is the profile's own
        # figure (memory_by_batch), so the stage records time only
        now = time.perf_counter()
        ctx.stages.append({"stage": AREA, "variant": name, "seconds": round(now - last[0], 3), "peak_rss_mb": None})
        last[0] = now
        steps.step(AREA, f"profiled {name}")

    rep = profile_variants(ctx.variants, ctx.ds, budgets, threads=1, runs=ctx.sizes["profiling_runs"], big_batch=32,
                           progress=done)
    ctx.results[AREA] = rep.to_dict()
    S.add_profiling(ctx.summary, ctx.results[AREA])
