"""Extraction audit as shards: one per scenario x attack x budget, every victim inside.

Each run of the grid is independent (a fresh attacker key per run, a seeded thief); a
cell keeps its victims together because victims that answer identically share one
trained thief, exactly as the unsharded loop does, so the merged runs equal it run for
run. A worker rebuilds the victims, OOD gate and thief pools from the model and data
files (all seeded); in-process the driver's own are used.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from hardening.errors import InputError
from hardening.executor import InProcessExecutor, Shard, ShardStore, run_shards
from hardening.intake import sha256_file


def run_cells(ctx, executor, checkpoint_dir, resume, progress, *, model_path, dataset, torch_source, scenarios,
              attacks, budgets, victims, thief_arch, train_steps, gate_alpha, guard) -> list:
    from hardening.extraction_audit import RunResult, _grid_order

    executor = executor or InProcessExecutor()
    remote = executor.name != "in-process"
    if remote and (guard is not None or not isinstance(dataset, (str, Path))):
        raise InputError(f"--executor {executor.name}: the extraction audit needs the data as a file path and the "
                         "default guard configuration (workers rebuild the victims from files)")
    common = {"model": str(Path(model_path).resolve()), "model_sha256": sha256_file(model_path),
              "data": str(Path(dataset).resolve()) if isinstance(dataset, (str, Path)) else None,
              "torch_source": None if torch_source is None else str(Path(torch_source).resolve()),
              "scenarios": list(scenarios), "victims": list(victims), "budgets": list(budgets),
              "thief_arch": thief_arch, "train_steps": int(train_steps), "gate_alpha": float(gate_alpha),
              "seed": int(ctx.seed)}
    local = None if remote else {"ctx": ctx}
    shards = [Shard("extraction-cell", f"{sc} / {a} / {b}", {**common, "scenario": sc, "attack": a, "budget": int(b)},
                    {}, local)
              for sc in scenarios for a in attacks for b in budgets]
    store = ShardStore(checkpoint_dir) if checkpoint_dir is not None else None
    total = len(shards)

    def shard_progress(done: int, _total: int, what: str) -> None:
        if progress:
            progress(done * len(victims), total * len(victims), f"shards {what}")

    done = run_shards(executor, shards, store, resume, shard_progress)
    runs = [RunResult(**r) for s in shards for r in done[s.id].meta["runs"]]
    return _grid_order(runs, scenarios, victims, attacks, budgets)


def run_cell_shard(meta: dict, arrays: dict, local: dict | None = None) -> tuple[dict, dict]:
    from hardening.extraction_audit import _run_cell, build_context

    ctx: Any = (local or {}).get("ctx")
    if ctx is None:
        ctx, _ = build_context(meta["model"], meta["data"], meta["torch_source"], meta["scenarios"], meta["victims"],
                               meta["budgets"], None, meta["thief_arch"], meta["train_steps"], meta["gate_alpha"],
                               meta["seed"])
    runs = _run_cell(ctx, meta["scenario"], meta["attack"], meta["budget"])
    return {"runs": [asdict(r) for r in runs]}, {}
