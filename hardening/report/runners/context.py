"""What every area runner of the full audit shares: inputs, variants, policy, executor, progress,
the output folder, and what the runners have produced so far (results, summary, stages)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardening.report.policy import Policy

# stage, message, done, total (done/total of the whole audit, in steps)
Progress = Callable[[str, str, int, int], None]


class Steps:
    """Turn area-level progress callbacks into one overall step counter."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def say(self, stage: str, msg: str = "") -> None:
        if self.progress:
            self.progress(stage, msg, self.done, self.total)

    def step(self, stage: str, msg: str = "") -> None:
        self.done += 1
        self.say(stage, msg)


@dataclass
class AuditContext:
    model: Path
    data: Path
    ds: Any  # hardening.data.Dataset: the loaded arrays every area audits
    out: Path
    policy: Policy
    profile: str
    seed: int
    sizes: dict  # the profile's work sizes with the caller's overrides
    torch_source: str | Path | None
    executor: Any  # hardening.executor: where sharded work runs (in-process by default)
    resume: bool
    steps: Steps
    variants: list = field(default_factory=list)  # hardening.compression.Variant
    summary: dict = field(default_factory=dict)  # variant -> normalised figures (summary.py)
    results: dict = field(default_factory=dict)  # area -> its report as a dict (None: not run)
    settings: dict = field(default_factory=dict)  # area -> the settings and seeds it was run with
    artifacts: dict = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)  # findings an area adds beyond the policy checks
    timings: dict[str, float] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)  # provenance.stages
    shards: list[dict] = field(default_factory=list)  # provenance.ood_shards (robustness keeps its own)
    detectors: dict[str, Path] = field(default_factory=dict)  # variant -> fitted gate (ood-fit)
    adaptive: dict[str, Any] = field(default_factory=dict)  # variant -> gate-aware evasion result or None

    @property
    def remote(self) -> bool:
        return self.executor.name != "in-process"

    @property
    def reference(self) -> str:
        """The float variant (else the first): quick profiles run the adaptive attacks on it only."""
        return next((v.name for v in self.variants if v.kind == "float"), self.variants[0].name)

    @contextmanager
    def stage(self, stage: str, variant: str | None = None) -> Iterator[dict]:
        """Measure a stage (wall time, peak RSS of this process and of its children) into
        ``provenance.stages``.

        Yields the record; a runner whose work ran as shards elsewhere raises its
        ``peak_rss_mb`` to the largest shard's (``shard_peak``)."""
        from hardening.executor.usage import measure, release_memory

        rec: dict = {"stage": stage, "variant": variant, "seconds": 0.0, "peak_rss_mb": 0.0}
        with measure() as used:
            yield rec
        elsewhere = rec["peak_rss_mb"]
        rec.update(used.record())
        rec["peak_rss_mb"] = max(used.peak_rss_mb, elsewhere)
        self.stages.append(rec)
        release_memory()  # what the stage left behind must not count against the next one


def share_record(ctx: AuditContext, stage: str, variant: str, shards: list) -> dict:
    """A variant's share of a sharded stage: its shards' compute seconds and their largest peak
    (each shard measured in the process that ran it: this one in-process, a worker otherwise)."""
    peak = shard_peak(shards)
    secs = sum(float((r.where if hasattr(r, "where") else r).get("seconds") or 0) for r in shards)
    return {"stage": stage, "variant": variant, "seconds": round(secs, 3), "peak_rss_mb": peak,
            "self_peak_rss_mb": None if ctx.remote else peak, "children_peak_rss_mb": None, "tree_peak_rss_mb": peak}


def shard_peak(results: Any) -> float:
    """Largest peak RSS over shard results (``ShardResult`` or provenance dicts); 0 when unknown."""
    peaks = [(r.where if hasattr(r, "where") else r).get("peak_rss_mb") or 0.0 for r in results]
    return float(max(peaks, default=0.0))
