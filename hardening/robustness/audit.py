"""``run_robustness_audit``: every model variant, every attack route, one worst-case number.

Routes per variant (success is always judged on the variant's onnxruntime session):
* float model with its PyTorch source -> white-box gradient attacks on the source;
* compressed variant (quantized/pruned) whose float parent source is known ->
  BPDA/straight-through gradients (forward = deployed logits, backward = parent) and
  transfer of examples crafted on the parent;
* every ONNX model -> Square (scores) and HopSkipJump (labels) on the session itself.
A model without source (or whose source does not match) is also attacked through a torch
copy of its own ONNX graph (``attacks.onnx_torch``), verified against the session first:
white-box when the graph is differentiable, BPDA (straight-through) when it rounds,
quantises or thresholds. ``routes.py`` decides; findings say what ran.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from attacks.estimators import (
    AsLogits,
    BPDARounding,
    OrtLogits,
    QueryCounter,
    ScaledLogits,
    StraightThrough,
    image_view,
    onnx_classifier,
    torch_classifier,
    torch_logits,
)
from attacks.evasion import (
    ATTACKS,
    DEFAULT_ATTACKS,
    budget_factor,
    check_attack_names,
    check_profile,
    craft,
    parse_norm,
    scale_budgets,
)
from attacks.onnx_torch import final_activation
from attacks.outputs import OutputConvention
from hardening.data import Dataset, load_dataset
from hardening.errors import DataError, InputError, ModelError
from hardening.executor.usage import release_memory
from hardening.intake import check_fits, load_model, make_session
from hardening.robustness import checks
from hardening.robustness import eps_grid as grids
from hardening.robustness.engine import Progress, Stage, Target, finite_or_clean
from hardening.robustness.results import AttackRun, ExampleResult, Finding, RobustnessReport, VariantResult
from hardening.robustness.routes import (
    batch_dependent,
    graph_route,
    logit_scale,
    same_outputs,
)
from hardening.robustness.stats import median_distance, perturbation_norms, project

SANITY_SUBSET = 16
ITER_SUBSET = 16
GRAD_SUBSET = 32
AGREE_WARN = 0.9
ESCALATE_ITER = 3  # Square iterations x3 and ...
ESCALATE_RESTARTS = 2  # ... 2 restarts once zero/non-finite gradients are found
ESCALATED_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square")  # iterative, epsilon-bounded
FAMILY_ORDER = ("white-box", "bpda", "transfer", "black-box", "decision")


@dataclass
class ModelSpec:
    """One model to audit and what we know about where it came from."""

    name: str
    path: str
    kind: str = "unknown"  # kind from variants.json, or "unknown" for a bare ONNX file
    parent: str | None = None
    torch_source: Any = None  # path or nn.Module of the float (parent) model


def resolve_models(models: list[Any], torch_source: Any = None) -> list[ModelSpec]:
    """ONNX paths, ``variants.json`` files or ``Variant`` objects -> ``ModelSpec`` list."""
    from hardening.compression import load_variants

    specs: list[ModelSpec] = []
    for m in models:
        if isinstance(m, ModelSpec):
            specs.append(m)
        elif hasattr(m, "kind") and hasattr(m, "path"):  # compression.Variant
            specs.append(ModelSpec(m.name, str(m.path), m.kind, m.parent, torch_source or m.torch_source))
        elif str(m).endswith(".json"):
            if not Path(m).is_file():
                raise InputError(f"{m}: variants file not found")
            for v in load_variants(m):
                specs.append(ModelSpec(v.name, v.path, v.kind, v.parent, torch_source or v.torch_source))
        else:
            specs.append(ModelSpec(Path(m).stem, str(m), "unknown", None, torch_source))
    if not specs:
        raise InputError("no models given")
    seen: dict[str, int] = {}
    for s in specs:  # unique names for the table and JSON
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"
        else:
            seen[s.name] = 0
    return specs


def _clip_values(ds: Dataset) -> tuple[float, float]:
    arrays = [a for a in (ds.x, ds.x_train, ds.x_cal) if a is not None]
    lo, hi = float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))
    if not hi > lo:
        raise DataError(f"{ds.source}: inputs are constant ({lo}); there is no range to perturb in")
    return lo, hi


def _check_eps(eps: list[float], norm_key: str, clip: tuple[float, float], dim: int) -> list[float]:
    width = clip[1] - clip[0]
    limit = width if norm_key == "inf" else width * math.sqrt(dim)
    out = []
    for e in eps:
        e = float(e)
        if not math.isfinite(e) or e <= 0:
            raise InputError(f"epsilon {e:g} must be a positive number")
        if e > limit:
            raise InputError(
                f"epsilon {e:g} is outside the data range: inputs span [{clip[0]:g}, {clip[1]:g}], "
                f"so an L{norm_key} perturbation above {limit:g} is meaningless"
            )
        out.append(e)
    if not out:
        raise InputError("no epsilon given")
    return sorted(set(out))


def _load_torch(src: Any, cache: dict) -> nn.Module | None:
    if src is None:
        return None
    if isinstance(src, nn.Module):
        return src.eval()
    key = str(Path(src).resolve())
    if key not in cache:
        from hardening.torch_source import load_torch_source

        cache[key] = load_torch_source(src)
    return cache[key]


def run_robustness_audit(
    models: list[Any],
    dataset: str | Path | Dataset,
    torch_source: Any = None,
    profile: str = "quick",
    eps: list[float] | None = None,
    norm: str = "inf",
    n: int = 200,
    seed: int = 0,
    attacks: list[str] | None = None,
    progress: Progress | None = None,
    self_checks: bool = True,
    executor: Any = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    shard_points: int | None = None,
) -> RobustnessReport:
    """Audit each model; robust accuracy = accuracy left after the whole attack cascade.

    ``models``: ONNX paths, a ``variants.json`` or ``compression.Variant`` objects;
    ``torch_source``: the float model's PyTorch source (path or module). ``eps`` is in
    input units; when none is given the grid is chosen to bracket where robust accuracy
    falls (``eps_grid.choose``: a cheap minimal-perturbation probe first), and
    ``RobustnessReport.eps_choice`` says how. Square and HopSkipJump budgets scale with the
    input dimension (``attacks.evasion.scale_budgets``), recorded per variant.

    The work runs as shards (``hardening.robustness.shards``: variant x ``shard_points``
    points) on ``executor`` (default in-process); with ``checkpoint_dir`` each finished
    shard is saved there and ``resume`` reads finished ones back instead of rerunning them.
    """
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    # Tiny models and many small calls: extra torch/BLAS threads only add contention
    # (measured 10-50x slower on 2 busy cores), so the audit runs single-threaded.
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return _run(models, dataset, torch_source, profile, eps, norm, n, seed, attacks, progress, self_checks,
                        executor, checkpoint_dir, resume, shard_points)
    finally:
        torch.set_num_threads(threads)


def _run(models, dataset, torch_source, profile, eps, norm, n, seed, attacks, progress, self_checks,
         executor=None, checkpoint_dir=None, resume=False, shard_points=None):
    t_start = time.perf_counter()
    settings = check_profile(profile)
    norm_v = parse_norm(norm)
    norm_key = "inf" if norm_v == np.inf else "2"
    names = check_attack_names(list(attacks) if attacks is not None else list(DEFAULT_ATTACKS[profile]))
    if not isinstance(n, int) or n < 1:
        raise InputError(f"--n must be a positive integer, got {n!r}")
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    clip = _clip_values(ds)
    dim = int(np.prod(ds.sample_shape))
    eps_grid = _check_eps(list(eps), norm_key, clip, dim) if eps else None
    specs = resolve_models(models, torch_source)
    infos = {}
    for s in specs:  # validate everything before the long part starts
        infos[s.name] = load_model(s.path)
        check_fits(infos[s.name], ds)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ds.x), size=min(n, len(ds.x)), replace=False))
    x, y = ds.x[pick], ds.y[pick]

    from hardening.executor import InProcessExecutor, ShardStore, run_shards
    from hardening.robustness import shards as sh

    executor = executor or InProcessExecutor()
    in_process = executor.name == "in-process"
    for s in specs:
        if not in_process and isinstance(s.torch_source, nn.Module):
            raise InputError(f"--executor {executor.name}: the PyTorch source of '{s.name}' must be a file path "
                             "(workers load it), not an in-memory module")
        if not in_process and s.torch_source is not None:
            s.torch_source = str(Path(s.torch_source).resolve())
        if not in_process:
            s.path = str(Path(s.path).resolve())
    findings: list[Finding] = []
    results: list[VariantResult] = []
    torch_cache: dict = {}
    prepared: dict[str, Prepared] = {}

    def prepare(s) -> Prepared:
        if s.name not in prepared:
            prepared[s.name] = _prepare(s, infos[s.name], x, y, settings, names, clip, torch_cache)
        return prepared[s.name]

    if eps_grid is None:  # probe the first variant a gradient route reaches (the float model, usually)
        probe = next((p for p in map(prepare, specs) if p.routes.first is not None), None) or prepare(specs[0])
        if progress:
            progress("choosing the epsilon grid (minimal-perturbation probe)", 0, 1)
        choice = grids.choose(probe.target, x, y, norm_v, norm_key, tuple(ds.sample_shape), probe.settings, seed)
        eps_grid = _check_eps(choice.eps, norm_key, clip, dim)
        choice.eps = eps_grid
        del probe
    else:
        choice = grids.given(eps_grid)
    size = sh.DEFAULT_SHARD_POINTS if shard_points is None else shard_points
    store = ShardStore(checkpoint_dir) if checkpoint_dir is not None else None
    t_shards = time.perf_counter()

    def shard_progress(done: int, total: int, what: str) -> None:
        if progress and not in_process:  # in-process shards report each attack themselves
            progress(f"shards {what}", done, total)

    # In this process one variant at a time: its routes (ONNX session, torch graph copy, ART
    # estimators) are built, attacked, merged and released before the next variant's are
    # built, so memory holds one variant's, not every variant's. Workers get every shard at once.
    plan: list = []
    done: dict = {}
    for group in ([[s] for s in specs] if in_process else [specs]):
        mine_prepared = {s.name: prepare(s) for s in group}
        local = {"prepared": mine_prepared, "progress": _no_done(progress)} if in_process else None
        gplan = sh.plan(group, x, y, eps_grid, norm_key, profile, names, clip, seed, self_checks, size, local)
        gdone = run_shards(executor, gplan, store, resume, shard_progress)
        plan += gplan
        done.update(gdone)
        for s in group:
            mine = [gdone[p.id] for p in gplan if p.meta["variant"]["name"] == s.name]
            points = [(r.meta, r.arrays) for r in mine if r.shard.kind == "robustness-points"]
            sc = next((sh.self_check_from(r.meta, r.arrays) for r in mine if r.shard.kind == "robustness-selfcheck"),
                      None)
            out = sh.merge_points(points, len(x))
            v, f = _finish(s, prepared[s.name], pick, x, y, out, eps_grid, norm_v, clip, sc, time.perf_counter(), seed)
            v.seconds = round(sum(float(r.where.get("seconds") or 0) for r in mine), 3)
            if progress:
                progress(f"{s.name} done", 1, 1)
            results.append(v)
            findings.extend(f)
            del prepared[s.name]
        mine_prepared.clear()  # the shards' ``local`` holds these too: drop them with the variant
        del gplan, gdone, local
        release_memory()
    wall = time.perf_counter() - t_shards
    execution = {"executor": executor.name, "workers": executor.workers(), "shard_points": size,
                 "shards_wall_s": round(wall, 3), "resumed": sum(r.resumed for r in done.values()),
                 "shards": [done[p.id].provenance() for p in plan]}
    by_name = {v.name: v for v in results}
    for s, v in zip(specs, results):
        if v.role != "compressed":
            continue
        parent = by_name.get(s.parent or "")
        if parent is None:  # bare ONNX files: the white-box model sharing the source
            parent = next((p for p in results if p.role == "white-box"), None)
        if parent is not None and parent is not v:
            findings.extend(checks.check_against_parent(v, parent))
    return RobustnessReport(
        profile=profile,
        norm=norm_key,
        eps=eps_grid,
        n=len(x),
        seed=seed,
        clip_values=clip,
        variants=results,
        findings=findings,
        seconds=round(time.perf_counter() - t_start, 3),
        execution=execution,
        eps_choice=choice.to_dict(),
    )


def _no_done(progress: Progress | None) -> Progress | None:
    """A shard's cascade ends with "<variant> done"; the variant is done only once merged."""
    if progress is None:
        return None
    return lambda msg, done, total: progress(msg[:-5] + " shard finished" if msg.endswith(" done") else msg, done, total)


@dataclass
class Routes:
    """The modules each gradient family attacks through, and where their gradients come from."""

    white_box: nn.Module | None = None  # the deployed model itself, differentiable
    white_box_source: str | None = None  # "torch-source" | "onnx-graph"
    bpda: nn.Module | None = None  # forward = deployed model, backward straight-through
    bpda_source: str | None = None  # "onnx-graph" | "parent-source" | "torch-source-rounding"
    transfer: nn.Module | None = None  # float parent source
    scale: float = 1.0  # constant applied to the logits the CE-based attacks see

    @property
    def first(self) -> tuple[str, nn.Module] | None:
        if self.white_box is not None:
            return "white-box", self.white_box
        if self.bpda is not None:
            return "bpda", self.bpda
        return None

    def describe(self) -> list[dict]:
        out = []
        if self.white_box is not None:
            out.append({"family": "white-box", "gradients": self.white_box_source})
        if self.bpda is not None:
            out.append({"family": "bpda", "gradients": self.bpda_source})
        if self.transfer is not None:
            out.append({"family": "transfer", "gradients": "parent-source"})
        return out


def _source_scores(module: nn.Module, x: np.ndarray, nb: int, name: str, convention: OutputConvention):
    """The source as a logits module (its probabilities as logits when it returns them)."""
    try:
        tl = torch_logits(module, x)
    except Exception as e:  # noqa: BLE001 - any failure here means the source does not fit
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ModelError(f"PyTorch source does not accept the data for '{name}': {first}") from None
    if tl.ndim != 2 or tl.shape[1] != nb:
        raise ModelError(f"PyTorch source returns {tuple(tl.shape[1:])} outputs, '{name}' has {nb} classes")
    if convention is not OutputConvention.LOGITS and convention.looks_like(tl):
        return AsLogits(module, convention), convention.to_logits(tl)
    return module, tl


@dataclass
class Prepared:
    """A variant ready to attack: its routes, estimators and the findings made on the way.
    Deterministic given the variant and the evaluation points, so every shard of the
    variant (in this process or on a worker) rebuilds the same one."""

    role: str
    agreement: float | None
    routes: Routes
    graph: Any
    convention: OutputConvention
    source_probs: bool
    grad_info: dict
    grad_findings: list[Finding]
    restored: str | None
    settings: dict
    target: Target
    findings: list[Finding]


def _prepare(s, info, x, y, settings, names, clip, torch_cache) -> Prepared:
    findings: list[Finding] = []
    nb = int(info.num_classes)
    shape = tuple(x.shape[1:])
    settings = scale_budgets(settings, int(np.prod(shape)))
    convention = info.output_convention
    if convention is OutputConvention.LOGITS:  # an int8 QLinearSoftmax/QLinearSigmoid ends in a dequantisation
        act = final_activation(onnx.load(str(s.path), load_external_data=False), info.logits_output)
        convention = OutputConvention.of_final_op(act)
    ort_fn = OrtLogits(make_session(s.path), info.input_name, info.logits_output, shape, convention=convention,
                       row_by_row=batch_dependent(s.path))
    module = _load_torch(s.torch_source, torch_cache)
    ol = ort_fn(x)  # the session's scores on the points, computed once for every check below
    graph = graph_route(s.path, info.input_name, info.logits_output, ort_fn, x, session_scores=ol)
    routes = Routes()
    role, agreement, src = "black-box", None, None
    if module is not None:
        src, tl = _source_scores(module, x, nb, s.name, convention)
        agreement = float(np.mean(tl.argmax(1) == ol.argmax(1)))
        same = same_outputs(tl, ol, convention)
        role = "white-box" if same else "compressed"
        if s.kind == "float" and not same:
            findings.append(Finding("warning", "SOURCE_MISMATCH", "the PyTorch source's outputs differ from this float "
                                    "ONNX model; attacking it as a derived variant (BPDA + transfer)", s.name))
        if role == "compressed" and agreement < AGREE_WARN:
            findings.append(Finding("warning", "LOW_AGREEMENT", f"variant agrees with its float parent on only "
                                    f"{agreement:.0%} of clean points; transfer and BPDA attacks are weaker", s.name))
    if role == "white-box":
        if graph.differentiable and convention is not OutputConvention.LOGITS and src is not module:
            # the source returns probabilities; the graph copy gives the activation's input itself
            routes.white_box, routes.white_box_source = graph.module, "onnx-graph"
        else:
            routes.white_box, routes.white_box_source = src, "torch-source"
    elif graph.differentiable:  # no source, or a derived variant (pruned): its own exact gradients
        routes.white_box, routes.white_box_source = graph.module, "onnx-graph"
        role = "white-box" if role == "black-box" else role
    if graph.usable and not graph.differentiable:
        routes.bpda, routes.bpda_source = graph.module, "onnx-graph"
        if role == "black-box":
            role = "white-box"  # its own graph's gradients (straight-through) reach it
    elif role == "compressed" and routes.white_box is None:
        routes.bpda, routes.bpda_source = StraightThrough(src, ort_fn), "parent-source"
    if role == "compressed":
        routes.transfer = src
    if module is None and s.kind not in ("float", "unknown") and not graph.usable:
        findings.append(Finding("info", "NO_PARENT_SOURCE", "no float parent source and the graph could not be "
                                "used: compressed variant attacked black-box only (score- and decision-based)", s.name))
    first = routes.first
    if first is not None:
        routes.scale = logit_scale(tl if src is not None and first[1] is src else torch_logits(first[1], x), y)
    grad_info: dict = {"graph": graph.to_dict(), "output_convention": convention.value, "logit_scale": routes.scale,
                       "judged_row_by_row": ort_fn.row_by_row}
    grad_findings: list[Finding] = []
    restored = None
    if first is not None:
        ok = np.flatnonzero(ol.argmax(1) == y)[:GRAD_SUBSET]
        if len(ok):
            g_info, grad_findings = checks.check_gradients(first[1], x[ok], y[ok], s.name)
            grad_info.update(g_info)
            grad_info["checked_route"] = first[0]
        if grad_findings:  # adaptive attack: straight-through gradients (BPDA) and a bigger Square budget
            restored = _restore(routes, src, ort_fn, role, x[ok], y[ok], s.name, grad_info)
            settings = {**settings, "square": _escalate(settings["square"]), "hsj": {**settings["hsj"], "sentinel": 0}}
            grad_info["escalated"] = {"square": settings["square"]}
            grad_findings = [_masking_message(f, restored, routes, graph) for f in grad_findings]
    grad_info["restored_by"] = restored
    surrogate = QueryCounter()
    stages = _stages(routes, ort_fn, names, shape, nb, clip, surrogate)
    if not stages:
        why = (graph.reason or "the graph copy does not match") if module is None else role
        raise InputError(
            f"none of the selected attacks ({', '.join(names)}) can reach '{s.name}' "
            f"(no gradient route: {why}; only square and hsj apply)"
        )
    target = Target(ort_fn, surrogate, stages, clip)
    return Prepared(role, agreement, routes, graph, convention, src is not None and src is not module, grad_info,
                    grad_findings, restored, settings, target, findings)


def _finish(s, p: Prepared, pick, x, y, out, eps_grid, norm_v, clip, self_check, t0,
            seed: int = 0) -> tuple[VariantResult, list]:
    """The variant's result from its (merged) cascade and its self-check shard."""
    findings = list(p.findings)
    role, agreement, routes, graph, convention = p.role, p.agreement, p.routes, p.graph, p.convention
    grad_info, grad_findings, restored, target = dict(p.grad_info), p.grad_findings, p.restored, p.target
    stages, first = target.stages, routes.first
    top = max(eps_grid)
    examples = [
        ExampleResult(
            index=int(pick[i]),
            label=int(y[i]),
            clean_pred=int(out.clean_pred[i]),
            correct=bool(out.correct[i]),
            broken_at_eps=None if np.isnan(out.broken_eps[i]) else float(out.broken_eps[i]),
            broken_by=out.broken_by[i],
            norm=None if np.isnan(out.break_norm[i]) else float(out.break_norm[i]),
            min_distance=float(out.min_dist[i]) if np.isfinite(out.min_dist[i]) else None,
            robust_beyond=top if out.robust[i] else None,
            queries=int(out.queries[i]),
            surrogate_queries=int(out.surrogate_queries[i]),
        )
        for i in range(len(x))
    ]
    med, lower = median_distance(out.min_dist[out.correct])
    v = VariantResult(
        name=s.name, path=s.path, kind=s.kind, role=role, families=target.families,
        clean_accuracy=float(out.correct.mean()), agreement_with_parent=agreement if role == "compressed" else None,
        eps=out.eps, attacks=out.runs, examples=examples, median_distance=med, median_is_lower_bound=lower,
        gradient_check=grad_info, output_convention=convention.value, gradient_routes=routes.describe(),
    )
    findings.extend(grad_findings)
    findings.extend(_route_findings(v, routes, graph, convention, p.source_probs))
    dim = int(np.prod(x.shape[1:]))
    v.budgets = {"dimension": dim, "factor": round(budget_factor(dim), 3),
                 **{a: dict(p.settings[a]) for a in ("square", "hsj") if a in p.settings}}
    if self_check is not None:
        findings.extend(_apply_self_checks(v, self_check, x, norm_v))
        mult = checks.escalation_multiplier(v.gradient_check.get("iterations", {}))
        if mult > 1:
            v.attacks.extend(_escalate_survivors(v, target, p.settings, mult, x, y, norm_v, clip, seed))
            v.budgets["escalated"] = {"attack": v.gradient_check["iterations"]["attack"], "multiplier": mult}
        checks.recount(v)
        dist = np.array([np.inf if ex.min_distance is None else ex.min_distance for ex in v.examples if ex.correct])
        v.median_distance, v.median_is_lower_bound = median_distance(dist)
    findings.extend(checks.check_family_gaps(v))
    masked = (first[0],) if grad_findings and first is not None else ()
    findings.extend(checks.check_losses(v, masked))
    gradient_ran = any(st.family in ("white-box", "bpda", "transfer") for st in stages)
    v.upper_bound_reason = checks.upper_bound_reason(v, findings, gradient_ran, restored)
    v.upper_bound = v.upper_bound_reason is not None
    v.seconds = round(time.perf_counter() - t0, 3)
    return v, findings


def _escalate_survivors(v: VariantResult, target: Target, settings, mult: int, x, y, norm_v, clip,
                        seed: int) -> list[AttackRun]:
    """Re-attack every point still standing at each epsilon with ``mult`` x the iterations of
    every iterative attack of the checked family (the iteration check found its budget had
    not converged), judged on the session."""
    main = checks.main_iterative_stage(target)
    lo, hi = clip
    ort = target.ort_fn
    runs = []
    for k, (e, stage) in enumerate((e, st) for e in v.eps for st in target.stages
                                   if st.family == main.family and st.attack in ESCALATED_ATTACKS):
        s = checks.iteration_settings(stage, settings[stage.attack], mult)
        idx = np.array([i for i, ex in enumerate(v.examples) if ex.correct
                        and (ex.broken_at_eps is None or ex.broken_at_eps > e.eps * (1 + 1e-9))], dtype=np.int64)
        t0, q0, s0 = time.perf_counter(), ort.counter.total, target.surrogate_counter.total
        hit = np.zeros(0, dtype=bool)
        if len(idx):
            cand = finite_or_clean(craft(stage.attack, stage.estimator, x[idx], y[idx], e.eps, norm_v, s,
                                         seed + 7919 + k), x[idx])
            cand = project(cand, x[idx], e.eps, norm_v, lo, hi)
            hit = ort.labels(cand) != y[idx]
            dist = perturbation_norms(cand, x[idx], norm_v)
            for j in np.flatnonzero(hit):
                ex = v.examples[int(idx[j])]
                ex.broken_at_eps, ex.broken_by, ex.norm = float(e.eps), f"escalated/{stage.attack}x{mult}", float(dist[j])
                ex.robust_beyond = None
                ex.min_distance = float(dist[j]) if ex.min_distance is None else min(ex.min_distance, float(dist[j]))
        runs.append(AttackRun(attack=f"{stage.attack}-x{mult}", family=stage.family, eps=float(e.eps),
                              attacked=int(len(idx)), broken=int(hit.sum()), queries=ort.counter.total - q0,
                              surrogate_queries=target.surrogate_counter.total - s0,
                              seconds=round(time.perf_counter() - t0, 4)))
    return runs


def _restore(routes: Routes, src, ort_fn, role, x, y, name, grad_info) -> str | None:
    """Find a straight-through route whose gradients are not masked; None when none is."""
    if routes.bpda is not None and routes.first and routes.first[0] == "white-box":
        info, bad = checks.check_gradients(routes.bpda, x, y, name)
        grad_info["bpda_gradients"] = info
        if not bad:
            return routes.bpda_source
    if src is not None:  # torch-mode straight-through rounding: works on eager modules only
        smooth = BPDARounding(src)
        info, bad = checks.check_gradients(smooth, x, y, name)
        grad_info["bpda_rounding_gradients"] = info
        if not bad:
            if role == "compressed":
                routes.bpda, routes.transfer = StraightThrough(smooth, ort_fn), smooth
            else:
                routes.bpda = smooth
            routes.bpda_source = "torch-source-rounding"
            return routes.bpda_source
    return None


_ROUTE_TEXT = {
    "onnx-graph": "straight-through gradients of the deployed ONNX graph",
    "parent-source": "straight-through gradients of the float parent source",
    "torch-source-rounding": "straight-through rounding in the (eager) PyTorch source",
}


def _masking_message(f: Finding, restored: str | None, routes: Routes, graph) -> Finding:
    """The gradient finding's text says what the audit then did, and whether it worked."""
    if restored:
        then = f"gradients restored by {_ROUTE_TEXT[restored]} (bpda family); Square budget escalated"
    else:
        why = graph.reason or ("the graph has no op a straight-through backward could fix"
                               if graph.usable else "no straight-through route")
        then = (f"no straight-through route restored them ({why}); Square budget escalated; "
                "the robust accuracy is an unreliable upper bound")
    return Finding(f.severity, f.code, f"{f.message}; {then}", f.variant)


def _route_findings(v, routes: Routes, graph, convention, source_probs: bool) -> list[Finding]:
    out = []
    runs = lambda fam: sum(r.attacked for r in v.attacks if r.family == fam and r.skipped is None)  # noqa: E731
    if not any(f in v.families for f in ("white-box", "bpda", "transfer")):
        why = graph.reason or ("no gradient attack selected" if routes.first is not None else "no PyTorch source")
        out.append(Finding("warning", "NO_GRADIENT_ROUTE", f"no gradient route reaches this model ({why}): only "
                           "score- and decision-based attacks ran; the robust accuracy is an upper bound", v.name))
    elif routes.white_box_source == "onnx-graph":
        out.append(Finding("info", "GRAPH_GRADIENTS", "white-box gradients come from a torch copy of the ONNX graph "
                           f"verified against onnxruntime on {v.eps[0].n} points (max |error| "
                           f"{graph.verification['max_abs_error']:.2g}); {runs('white-box')} point-attacks ran", v.name))
    if routes.bpda_source == "onnx-graph":
        ops = ", ".join(graph.non_differentiable) or "none"
        out.append(Finding("info", "STRAIGHT_THROUGH", f"BPDA through the deployed graph (non-differentiable ops: {ops}; "
                           f"copy {graph.status.value}); {runs('bpda')} point-attacks ran", v.name))
    if convention is not OutputConvention.LOGITS:
        op, inverse = (("Softmax", "log-probabilities") if convention is OutputConvention.PROBABILITIES
                       else ("Sigmoid", "the logit of each probability"))
        how = f"the {op} input of the graph copy" if graph.activation_dropped and routes.first is not None and (
            routes.white_box_source == "onnx-graph" or routes.bpda_source == "onnx-graph") else inverse
        out.append(Finding("info", "PROBABILITY_OUTPUT", f"the model outputs {op} probabilities: attacks use "
                           f"{how} (never cross-entropy on probabilities)"
                           + ("; the PyTorch source returns probabilities too" if source_probs else ""), v.name))
    if routes.scale < 1.0:
        out.append(Finding("info", "LOGITS_RESCALED", f"logit margins are huge (cross-entropy gradients vanish in "
                           f"float32): CE-based attacks see the logits times {routes.scale:.3g}", v.name))
    return out


def _escalate(square: dict) -> dict:
    """Square budget when gradients are masked: the score-based search is all that works."""
    return {**square, "max_iter": int(square["max_iter"]) * ESCALATE_ITER, "nb_restarts": ESCALATE_RESTARTS,
            "sentinel": 0}  # every survivor: the gradients cannot be trusted to have found the easy ones


def _stages(routes: Routes, ort_fn, names, shape, nb, clip, surrogate) -> list[Stage]:
    stages: list[Stage] = []
    grads = [a for a in names if ATTACKS[a].access == "gradients"]

    def est(m):
        return torch_classifier(ScaledLogits(m, routes.scale) if routes.scale < 1.0 else m, shape, nb, clip, surrogate)

    if routes.white_box is not None:
        wb = est(routes.white_box)
        stages += [Stage("white-box", a, wb) for a in grads]
    if routes.bpda is not None:
        bp = est(routes.bpda)
        stages += [Stage("bpda", a, bp) for a in grads]
    if routes.transfer is not None:
        tr = est(routes.transfer)
        stages += [Stage("transfer", a, tr) for a in grads if a != "deepfool"]
    if "square" in names:
        view = image_view(shape)
        stages.append(Stage("black-box", "square", onnx_classifier(ort_fn, nb, clip, view_shape=view)))
    if "hsj" in names:
        stages.append(Stage("decision", "hsj", onnx_classifier(ort_fn, nb, clip, labels_only=True)))
    return sorted(stages, key=lambda st: FAMILY_ORDER.index(st.family))


def run_self_checks(name, target, x, y, eps_grid, norm_v, settings, clip, seed) -> dict:
    """Sanity-epsilon and iteration checks of one variant (a shard of their own): plain data
    back, the 4x run's adversarials under ``iterations["_adversarial"]``."""
    correct = target.ort_fn.labels(x) == y
    ok = np.flatnonzero(correct)
    if len(ok) == 0:
        return {"findings": [Finding("warning", "NO_CORRECT_POINTS", "the model gets no evaluation point right",
                                     name)]}
    width = clip[1] - clip[0]
    sanity_eps = 0.5 * width if norm_v == np.inf else 0.5 * width * math.sqrt(x[0].size)
    sub = ok[:SANITY_SUBSET]
    sanity, f = checks.check_sanity(target, x[sub], y[sub], sanity_eps, norm_v, settings, seed, name)
    mid = eps_grid[len(eps_grid) // 2]
    sub = ok[:ITER_SUBSET]
    iters, f2 = checks.check_iterations(target, x[sub], y[sub], mid, norm_v, settings, seed, name)
    return {"findings": f + f2, "sanity": sanity, "iterations": iters, "rows": sub}


def _apply_self_checks(v, sc: dict, x, norm_v) -> list[Finding]:
    found = list(sc["findings"])
    if "sanity" not in sc:
        return found
    v.gradient_check["sanity"] = sc["sanity"]
    info, sub = dict(sc["iterations"]), sc["rows"]
    found += checks.check_convergence(v, sub, info, x[sub], norm_v)
    v.gradient_check["iterations"] = info
    return found
