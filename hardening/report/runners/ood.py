"""OOD runners: ``fit`` fits and calibrates each variant's gate; ``run`` scores every OOD family
through it with the exported runtime scorer, one shard per family x variant on the audit's
executor (checkpointed; the merge puts the families back in their order, so any executor
gives the same figures). The families are built once here and travel as arrays."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hardening.executor import Shard, ShardStore, run_shards
from hardening.intake import sha256_file
from hardening.report import summary as S
from hardening.report.runners.context import AuditContext, shard_peak, share_record

if TYPE_CHECKING:
    from hardening.ood import OODAudit

AREA = "ood"


def fit(ctx: AuditContext) -> None:
    pol = ctx.policy
    ctx.settings[AREA] = {"alpha": pol.ood.alpha, "frr_slack": pol.ood.frr_slack, "frr_delta": pol.ood.frr_delta,
                          "n_synthetic": ctx.sizes["ood_synthetic"], "seed": ctx.seed, "detector": "ensemble"}
    ctx.artifacts["detectors"] = {}
    ctx.artifacts["roc_plots"] = {}
    ctx.results[AREA] = {"variants": {}}
    for v in ctx.variants:
        ctx.steps.say(AREA, f"{v.name}: fitting detectors")
        det_dir = ctx.out / "detectors" / v.name
        with ctx.stage("ood-fit", v.name):
            from hardening.ood import fit_ood  # scikit-learn: its import is part of the first fit

            ctx.results[AREA]["variants"][v.name] = {"fit": fit_ood(
                v.path, ctx.ds, det_dir, alpha=pol.ood.alpha, seed=ctx.seed, slack=pol.ood.frr_slack,
                delta=pol.ood.frr_delta).to_dict()}
        ctx.detectors[v.name] = det_dir


def _families(ctx: AuditContext, v, shared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The variant's families: the ``shared`` ones (the same arrays for every variant) plus,
    last, the adversarial examples of the attacker who knew this variant's gate."""
    from hardening.ood.families import checked_adversarial

    adaptive = ctx.adaptive.get(v.name)
    adv = max(adaptive.adversarial_examples.items()) if adaptive is not None else None
    if adv is None or not len(adv[1]):
        return dict(shared)
    return {**shared, f"{S.ADAPTIVE_FAMILY}{adv[0]:g}": checked_adversarial(ctx.ds, adv[1])}


def _shared_families(ctx: AuditContext) -> dict[str, np.ndarray]:
    """The families every variant is scored on, built once: they depend on the data and the
    seed only, so one copy serves every variant (not one copy per variant held at once)."""
    from hardening.intake import load_model
    from hardening.ood.families import build_families

    info = load_model(ctx.variants[0].path)
    return build_families(ctx.ds, num_classes=info.num_classes or int(ctx.ds.y.max()) + 1,
                          n=ctx.sizes["ood_synthetic"], seed=ctx.seed)


def run(ctx: AuditContext) -> None:
    with ctx.stage(AREA) as rec:
        plan, done = _score_families(ctx)
        rec["peak_rss_mb"] = shard_peak(done.values())
    ctx.shards += [done[s.id].provenance() for ss in plan.values() for s in ss]
    for v in ctx.variants:
        mine = [done[s.id] for s in plan[v.name]]
        d = merge_families(mine).to_dict()
        d["fit"] = ctx.results[AREA]["variants"][v.name]["fit"]
        adaptive = ctx.adaptive.get(v.name)
        d["adaptive_evasion"] = adaptive.to_dict() if adaptive is not None else None
        d["plots"] = [os.path.relpath(p, ctx.out) for p in d["plots"]]
        ctx.results[AREA]["variants"][v.name] = d
        ctx.artifacts["detectors"][v.name] = os.path.relpath(ctx.detectors[v.name], ctx.out)
        ctx.artifacts["roc_plots"][v.name] = d["plots"]
        S.add_ood(ctx.summary, v.name, d)
        ctx.stages.append(share_record(ctx, AREA, v.name, mine))
        ctx.steps.step(AREA, f"{v.name} done")


def _score_families(ctx: AuditContext) -> tuple[dict[str, list[Shard]], dict]:
    """Build each variant's families, one shard per family; run them (checkpointed) on the executor."""
    plan: dict[str, list[Shard]] = {}
    shared = _shared_families(ctx)
    for v in ctx.variants:
        fams = _families(ctx, v, shared)
        det = ctx.detectors[v.name].resolve()
        # the digests make a refitted gate or a changed model a different shard (never a stale --resume)
        common = {"model": str(Path(v.path).resolve()), "model_sha256": sha256_file(v.path),
                  "data": str(Path(ctx.data).resolve()), "detectors": str(det),
                  "detectors_sha256": {f.name: sha256_file(f) for f in sorted(det.iterdir()) if f.is_file()},
                  "out": str((ctx.out / "ood" / v.name).resolve())}
        local = None if ctx.remote else {"ds": ctx.ds}
        plan[v.name] = [Shard("ood-family", f"{v.name} ood {fam}", {**common, "family": fam}, {"x": x}, local)
                        for fam, x in fams.items()]
    shards = [s for ss in plan.values() for s in ss]
    store = ShardStore(ctx.out)

    def progress(done: int, total: int, what: str) -> None:
        ctx.steps.say(AREA, f"families {done}/{total}: {what}")

    return plan, run_shards(ctx.executor, shards, store, ctx.resume, progress)


def merge_families(parts: list) -> OODAudit:
    """Family shards of one variant (in family order) -> the variant's ``OODAudit``: the
    in-distribution figures are the same in every shard; metrics and plots concatenate."""
    from hardening.ood import FamilyMetrics, OODAudit

    first = parts[0].meta
    audit = OODAudit(alpha=first["alpha"], threshold=first["threshold"], n_id=first["n_id"], id_frr=first["id_frr"])
    for r in parts:
        if r.meta["id_frr"] != first["id_frr"] or r.meta["threshold"] != first["threshold"]:
            raise ValueError(f"OOD shard {r.shard.label} scored the in-distribution split differently")
        audit.metrics += [FamilyMetrics(**m) for m in r.meta["metrics"]]
        audit.plots += r.meta["plots"]
    return audit


def run_family_shard(meta: dict, arrays: dict, local: dict | None = None) -> tuple[dict, dict]:
    """Score one family through one variant's exported gate (``hardening.ood.audit_ood``)."""
    from hardening.ood import audit_ood

    data = (local or {}).get("ds")
    data = meta["data"] if data is None else data
    audit = audit_ood(meta["model"], data, meta["detectors"], meta["out"], families={meta["family"]: arrays["x"]})
    d = audit.to_dict()
    return {k: d[k] for k in ("alpha", "threshold", "n_id", "id_frr", "metrics", "plots")}, {}
