"""Robustness audit as shards: variant x point range, plus one self-check shard per variant.

Every point-range shard runs the whole epsilon cascade on its points (survivors only at
the next epsilon, minimal-perturbation attacks once per point), with the seed
``seed + SHARD_SEED_STRIDE * k`` for the k-th range of a variant (k = 0 keeps the plain
seed: a sample that fits one shard audits exactly as before sharding existed). The
in-process executor runs these same shards with the same seeds, so any executor merges
to the same report. Epsilons stay inside a shard: splitting them would re-attack points
already broken at a smaller epsilon and rerun DeepFool/HopSkipJump per epsilon.

Merge (worst case, per example): a point's record comes from the one shard that holds
it; per-epsilon counts, cumulative after-family counts and attack runs are sums over
shards; a point is robust at an epsilon only if every attack of its shard failed there.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np

from hardening.executor.base import Shard
from hardening.intake import sha256_file
from hardening.robustness.engine import CascadeOutcome, run_cascade
from hardening.robustness.results import AttackRun, EpsResult, Finding
from hardening.robustness.stats import wilson_interval

DEFAULT_SHARD_POINTS = 64  # the quick audit's point cap: CI audits stay one shard per variant
SHARD_SEED_STRIDE = 100_003  # above any seed offset the cascade adds (1000 * eps index + stage index)
OUTCOME_ARRAYS = ("clean_pred", "correct", "broken_eps", "break_norm", "min_dist", "queries", "surrogate_queries")


def point_ranges(n: int, shard_points: int | None) -> list[tuple[int, int]]:
    size = n if not shard_points else max(1, int(shard_points))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def shard_seed(seed: int, k: int) -> int:
    return int(seed) + SHARD_SEED_STRIDE * k


def variant_meta(spec) -> dict:
    src = spec.torch_source
    if src is not None and not isinstance(src, (str, bytes)) and not hasattr(src, "__fspath__"):
        src = f"<in-memory module {type(src).__name__}>"  # in-process only (local carries the module)
    # the digest makes a rebuilt variant with other bytes at the same path a different shard
    return {"name": spec.name, "path": str(spec.path), "sha256": sha256_file(spec.path), "kind": spec.kind,
            "parent": spec.parent, "torch_source": None if src is None else str(src)}


def plan(specs, x, y, eps_grid, norm_key, profile, names, clip, seed, self_checks, shard_points,
         local: dict | None = None) -> list[Shard]:
    """The shards of one audit, in a fixed order (variant, then point range, then self-check)."""
    shards: list[Shard] = []
    common = {"eps": [float(e) for e in eps_grid], "norm": norm_key, "profile": profile, "attacks": list(names),
              "clip": [float(clip[0]), float(clip[1])], "seed": int(seed)}
    arrays = {"x": x, "y": y}
    for s in specs:
        vm = variant_meta(s)
        for k, (a, b) in enumerate(point_ranges(len(x), shard_points)):
            meta = {**common, "variant": vm, "start": a, "stop": b, "shard_seed": shard_seed(seed, k)}
            shards.append(Shard("robustness-points", f"{s.name} points {a}:{b}", meta, arrays, local))
        if self_checks:
            shards.append(Shard("robustness-selfcheck", f"{s.name} self-checks", {**common, "variant": vm}, arrays,
                                local))
    return shards


def _prepared(meta: dict, arrays: dict, local: dict | None):
    """The variant's routes: the driver's own in-process, rebuilt from the files on a worker."""
    from attacks.evasion import check_profile
    from hardening.intake import load_model
    from hardening.robustness import audit

    name = meta["variant"]["name"]
    if local is not None and name in local.get("prepared", {}):
        return local["prepared"][name]
    v = meta["variant"]
    spec = audit.ModelSpec(v["name"], v["path"], v["kind"], v["parent"], v["torch_source"])
    return audit._prepare(spec, load_model(v["path"]), arrays["x"], arrays["y"], check_profile(meta["profile"]),
                          meta["attacks"], tuple(meta["clip"]), {})


def _one_thread():
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    return threadpool_limits(1)


def run_points_shard(meta: dict, arrays: dict, local: dict | None = None) -> tuple[dict, dict]:
    with _one_thread():
        p = _prepared(meta, arrays, local)
        a, b = meta["start"], meta["stop"]
        norm = np.inf if meta["norm"] == "inf" else 2.0
        progress = (local or {}).get("progress")
        out = run_cascade(p.target, arrays["x"][a:b], arrays["y"][a:b], meta["eps"], norm, p.settings,
                          meta["shard_seed"], progress, label=meta["variant"]["name"])
    res = {"start": a, "stop": b, "eps": [asdict(e) for e in out.eps], "runs": [asdict(r) for r in out.runs],
           "broken_by": out.broken_by}
    return res, {k: getattr(out, k) for k in OUTCOME_ARRAYS}


def run_selfcheck_shard(meta: dict, arrays: dict, local: dict | None = None) -> tuple[dict, dict]:
    from hardening.robustness.audit import run_self_checks

    with _one_thread():
        p = _prepared(meta, arrays, local)
        norm = np.inf if meta["norm"] == "inf" else 2.0
        sc = run_self_checks(meta["variant"]["name"], p.target, arrays["x"], arrays["y"], meta["eps"], norm,
                             p.settings, tuple(meta["clip"]), meta["seed"])
    out_arrays = {}
    if "iterations" in sc:
        adv = sc["iterations"].pop("_adversarial", None)
        if adv is not None:
            out_arrays["adversarial"] = np.asarray(adv)
        out_arrays["rows"] = np.asarray(sc.pop("rows"), dtype=np.int64)
    sc["findings"] = [f.to_dict() for f in sc["findings"]]
    return sc, out_arrays


def self_check_from(meta: dict, arrays: dict) -> dict:
    """A self-check shard's result as ``audit._apply_self_checks`` takes it."""
    sc = {"findings": [Finding(**f) for f in meta["findings"]]}
    if "sanity" in meta:
        it = dict(meta["iterations"])
        if "adversarial" in arrays:
            it["_adversarial"] = arrays["adversarial"]
        sc.update(sanity=meta["sanity"], iterations=it, rows=arrays["rows"])
    return sc


def merge_points(parts: list[tuple[dict, dict]], n: int) -> CascadeOutcome:
    """Point-range shards of one variant -> the variant's cascade outcome (see module doc)."""
    parts = sorted(parts, key=lambda p: p[0]["start"])
    covered = [i for m, _ in parts for i in range(m["start"], m["stop"])]
    if covered != list(range(n)):
        raise ValueError(f"point shards do not cover 0:{n} exactly once")
    cat = {k: np.concatenate([np.asarray(arr[k]) for _, arr in parts]) for k in OUTCOME_ARRAYS}
    eps_out: list[EpsResult] = []
    for j, e0 in enumerate(parts[0][0]["eps"]):
        per = [m["eps"][j] for m, _ in parts]
        robust = int(sum(e["robust"] for e in per))
        after: dict[str, float] = {}
        for fam in e0["robust_after_family"]:  # fractions of each shard's points -> counts -> fraction of all
            alive = sum(round(e["robust_after_family"][fam] * e["n"]) for e in per)
            after[fam] = float(alive) / n
        first: dict[str, int] = {}
        for e in per:
            for att, c in e["broken_by"].items():
                first[att] = first.get(att, 0) + int(c)
        lo, hi = wilson_interval(robust, n)
        eps_out.append(EpsResult(e0["eps"], robust, n, robust / n, lo, hi, after, first))
    runs: list[AttackRun] = []
    for j, r0 in enumerate(parts[0][0]["runs"]):
        rs = [m["runs"][j] for m, _ in parts]
        skipped = next((r["skipped"] for r in rs if r["skipped"]), None)
        runs.append(AttackRun(attack=r0["attack"], family=r0["family"], eps=r0["eps"],
                              attacked=sum(r["attacked"] for r in rs), broken=sum(r["broken"] for r in rs),
                              queries=sum(r["queries"] for r in rs),
                              surrogate_queries=sum(r["surrogate_queries"] for r in rs),
                              seconds=round(math.fsum(r["seconds"] for r in rs), 4), skipped=skipped))
    broken_by = [b for m, _ in parts for b in m["broken_by"]]
    return CascadeOutcome(eps=eps_out, runs=runs, clean_pred=cat["clean_pred"], correct=cat["correct"].astype(bool),
                          broken_eps=cat["broken_eps"], broken_by=broken_by, break_norm=cat["break_norm"],
                          min_dist=cat["min_dist"], queries=cat["queries"], surrogate_queries=cat["surrogate_queries"],
                          x_adv=np.empty((0,)))
