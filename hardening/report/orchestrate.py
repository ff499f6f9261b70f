"""``run_full_audit``: intake -> compression -> one runner per area over a shared
``AuditContext`` (``hardening.report.runners``), then policy checks and the three outputs
(report.json, report.html, junit.xml).

Every area is someone else's module; the runners only call them, record the settings and
seeds they passed, and normalise their results (``summary.py``); this file sequences the
runners and judges what they produced. Each stage's wall time and peak memory go into
``provenance.stages``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hardening.errors import InputError
from hardening.intake import sha256_file
from hardening.jsonio import dumps
from hardening.paths import portable
from hardening.report import summary as S
from hardening.report.checks import FAIL, SKIP, Check, evaluate_policy
from hardening.report.defences import defence_table
from hardening.report.policy import Policy
from hardening.report.runners import AREA_RUNNERS, AREAS, AuditContext, Progress, Steps
from hardening.report.schema import SCHEMA_NAME, SCHEMA_VERSION, validate_report

PROFILES = ("quick", "thorough")
LIBRARIES = ("numpy", "onnx", "onnxruntime", "torch", "adversarial-robustness-toolbox", "scikit-learn", "scipy",
             "matplotlib", "cryptography", "jsonschema", "typer", "rich")
# Per-profile work sizes; the policy's robustness.n and extraction.budget are added on top.
PROFILE_SETTINGS = {
    "quick": {"profiling_runs": 100, "ood_synthetic": 200, "robustness_n_cap": 64},
    "thorough": {"profiling_runs": 400, "ood_synthetic": 1000, "robustness_n_cap": None},
}


@dataclass
class AuditOutputs:
    report: dict
    report_path: Path
    html_path: Path
    junit_path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.report["verdict"]["passed"])


def _file(path: str | Path | None, base: Path | None) -> dict | None:
    """A recorded input: its path (``hardening.paths`` rule, absolute without ``base``) and digest."""
    if path is None:
        return None
    p = Path(path)
    stored = portable(p, base) if base is not None else str(p.resolve())
    return {"path": stored, "sha256": sha256_file(p), "size_bytes": p.stat().st_size}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def _edgeward_version() -> str:
    try:
        return metadata.version("edgeward")
    except metadata.PackageNotFoundError:
        return "0+source"


def run_full_audit(
    model: str | Path,
    data: str | Path,
    out_dir: str | Path,
    *,
    torch_source: str | Path | None = None,
    variants_file: str | Path | None = None,
    kinds: tuple[str, ...] | None = None,
    policy: Policy | None = None,
    profile: str = "quick",
    seed: int = 0,
    areas: tuple[str, ...] = AREAS,
    sizes: dict | None = None,
    progress: Progress | None = None,
    command: str = "",
    allow_skipped: bool = False,
    executor: Any = None,
    resume: bool = False,
) -> AuditOutputs:
    """Audit every variant of ``model`` and write report.json, report.html and junit.xml to ``out_dir``.

    ``variants_file``: use these variants (a ``variants.json``) instead of compressing.
    ``kinds``: compression kinds (default: all; pruning on the ONNX graph without a usable source).
    ``areas``: subset of profiling/robustness/extraction/ood to run (skipped ones show as
    skipped checks, never as passes; the verdict fails on them unless ``allow_skipped``).
    ``sizes``: override the profile's work sizes (keys of ``PROFILE_SETTINGS`` plus
    ``extraction_budgets``), e.g. to keep tests small; recorded in the settings.
    ``executor`` (``hardening.executor``; default in-process): where the sharded areas
    (robustness, extraction, OOD) run; their finished shards are checkpointed in ``out_dir``
    and ``resume`` reuses them.
    """
    from hardening.executor.usage import frozen_survivors

    with frozen_survivors():
        return _run_full_audit(model, data, out_dir, torch_source=torch_source, variants_file=variants_file,
                               kinds=kinds, policy=policy, profile=profile, seed=seed, areas=areas, sizes=sizes,
                               progress=progress, command=command, allow_skipped=allow_skipped, executor=executor,
                               resume=resume)


def _run_full_audit(model, data, out_dir, *, torch_source, variants_file, kinds, policy, profile, seed, areas, sizes,
                    progress, command, allow_skipped, executor, resume) -> AuditOutputs:
    from hardening.executor import InProcessExecutor

    t_all = time.perf_counter()
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose quick or thorough")
    bad = set(areas) - set(AREAS)
    if bad:
        raise InputError(f"unknown area(s) {sorted(bad)}; choose from {', '.join(AREAS)}")
    ps = {**PROFILE_SETTINGS[profile], "extraction_budgets": None}
    unknown_sizes = set(sizes or {}) - set(ps)
    if unknown_sizes:
        raise InputError(f"unknown size override(s) {sorted(unknown_sizes)}; known: {', '.join(ps)}")
    ps.update(sizes or {})
    policy = policy or Policy()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = AuditContext(model=Path(model), data=Path(data), ds=None, out=out, policy=policy, profile=profile, seed=seed,
                       sizes=ps, torch_source=torch_source, executor=executor or InProcessExecutor(), resume=resume,
                       steps=Steps(0, progress))
    with ctx.stage("intake"):
        n_variants = _intake(ctx, variants_file, kinds)
    ctx.steps.total = 1 + len(areas) * n_variants + 1
    if variants_file is None:
        ctx.steps.say("compression", f"making {n_variants} variant(s)")
        t0 = time.perf_counter()
        with ctx.stage("compress"):
            _compress(ctx, kinds)
        ctx.timings["compression_s"] = time.perf_counter() - t0
    ctx.steps.step("compression", f"{len(ctx.variants)} variant(s)")
    if not ctx.variants:
        raise InputError("no variants to audit")
    if torch_source is not None:
        for v in ctx.variants:
            v.torch_source = v.torch_source or str(torch_source)
    ctx.summary = {v.name: S.empty_variant(v.kind) for v in ctx.variants}
    ctx.findings = _admission_findings(ctx.variants) + _skipped_findings(ctx, variants_file)
    ctx.results = {a: None for a in AREAS}
    ctx.settings = {"sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ps.items()}}
    for area in AREAS:
        if area in areas:
            t0 = time.perf_counter()
            for step in AREA_RUNNERS[area]:
                step(ctx)
            ctx.timings[f"{area}_s"] = time.perf_counter() - t0
    return _finish(ctx, model, data, torch_source, variants_file, areas, command, allow_skipped, t_all)


def _intake(ctx: AuditContext, variants_file, kinds) -> int:
    """Load and check the model and data (and the given variants); the number of variants to come."""
    from hardening.compression import KINDS, load_variants
    from hardening.data import load_dataset
    from hardening.intake import check_fits, load_model

    info = load_model(ctx.model)
    ctx.ds = load_dataset(ctx.data)
    check_fits(info, ctx.ds)
    if variants_file is not None:
        ctx.variants = load_variants(variants_file)
        return len(ctx.variants)
    return len(kinds or KINDS)


def _compress(ctx: AuditContext, kinds) -> None:
    from hardening.compression import KINDS, compress

    ctx.variants = compress(ctx.model, ctx.data, ctx.out / "variants", torch_source=ctx.torch_source,
                            kinds=kinds or KINDS, profile=ctx.profile,
                            max_accuracy_drop=ctx.policy.accuracy.max_drop_vs_float)


def _finish(ctx: AuditContext, model, data, torch_source, variants_file, areas, command, allow_skipped,
            t_all: float) -> AuditOutputs:
    """Policy checks, findings and verdict over what the runners produced; the three outputs."""
    policy, out, variants, summary = ctx.policy, ctx.out, ctx.variants, ctx.summary
    names = [v.name for v in variants]
    ref = next((v.name for v in variants if v.kind == "float"), None)
    summ = {"reference": ref, "reference_clean_accuracy": summary[ref]["clean_accuracy"] if ref else None, "variants": summary}
    ran = {a: a in areas for a in AREAS}
    checks = evaluate_policy(summ, policy, ran)
    findings = _findings(checks, ctx.results, ctx.findings)
    verdict = _verdict(checks, names, allow_skipped)
    ctx.timings["total_s"] = time.perf_counter() - t_all
    report = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "edgeward", "version": _edgeward_version(), "command": command or " ".join(sys.argv)},
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "libraries": library_versions(),
        },
        "inputs": {
            "model": _file(model, out),
            "data": _file(data, out),
            "torch_source": _file(torch_source, out),
            "variants_file": _file(variants_file, out),
            "policy": _file(policy.source, out),
        },
        "settings": {"profile": ctx.profile, "seed": ctx.seed, "policy": policy.to_dict(), "areas": ctx.settings},
        "variants": [
            {"name": v.name, "kind": v.kind, "parent": v.parent, "path": portable(v.path, out), "sha256": v.sha256,
             "size_bytes": Path(v.path).stat().st_size, "recipe": v.recipe}
            for v in variants
        ],
        "summary": summ,
        "defences": defence_table(summ, policy.to_dict()),
        "results": ctx.results,
        "checks": [c.to_dict() for c in checks],
        "findings": findings,
        "verdict": verdict,
        "timings": {k: round(v, 3) for k, v in ctx.timings.items()},
        "artifacts": ctx.artifacts,
        "provenance": {"executor": {"name": ctx.executor.name, "workers": ctx.executor.workers(), "resume": ctx.resume},
                       "stages": ctx.stages, "ood_shards": ctx.shards},
    }
    report = json.loads(dumps(report))  # plain JSON types (numpy scalars, tuples) before validation
    validate_report(report, "generated report")
    ctx.steps.say("report", "writing report.json, report.html, junit.xml")
    paths = write_outputs(report, out)
    ctx.steps.step("report", "done")
    return AuditOutputs(report, *paths, checks=checks)


def rejudge(report: dict, policy: Policy) -> dict:
    """The same measurements judged by another policy: new checks, findings and verdict.

    Only thresholds change; figures that depend on the policy (the robustness epsilons,
    the extraction budget grid) keep what was measured, and a threshold at an epsilon
    that was not measured is skipped.
    """
    import copy

    out = copy.deepcopy(report)
    s = out["summary"]
    for v in s["variants"].values():  # extraction figures follow the new budget and target
        ex = v.get("extraction")
        if ex:
            v["extraction"] = S.extraction_figures(ex["curve"], policy.extraction.budget,
                                                   policy.extraction.target_fidelity, ex.get("attack"))
    ran = {a: report["results"].get(a) is not None for a in AREAS}
    checks = evaluate_policy(s, policy, ran)
    extra = [f for f in report["findings"] if f["code"] in ("EXTRACTION_SELF_CHECK", "EXTRACTION_UNAVAILABLE", "ADMISSION_REJECTED")]
    out["checks"] = [c.to_dict() for c in checks]
    out["findings"] = _findings(checks, out["results"], extra)
    out["verdict"] = _verdict(checks, [v["name"] for v in out["variants"]], report["verdict"].get("allow_skipped", False))
    out["settings"]["policy"] = policy.to_dict()
    out["inputs"]["policy"] = _file(policy.source, None)
    return validate_report(json.loads(dumps(out)), "re-judged report")


def write_outputs(report: dict, out: Path) -> tuple[Path, Path, Path]:
    from hardening.report.html import render_html
    from hardening.report.junit import render_junit

    rp, hp, jp = out / "report.json", out / "report.html", out / "junit.xml"
    rp.write_text(dumps(report) + "\n")
    hp.write_text(render_html(report, base_dir=out))
    jp.write_text(render_junit(report))
    return rp, hp, jp


def report_digest(path: str | Path) -> str:
    """SHA-256 of the report.json bytes, as recorded in bundle manifests."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _skipped_findings(ctx: AuditContext, variants_file) -> list[dict]:
    """Variants compression left out (a pruned variant that lost too much accuracy): say why."""
    from hardening.compression import VARIANTS_FILE, skipped_variants

    path = Path(variants_file) if variants_file is not None else ctx.out / "variants" / VARIANTS_FILE
    return [{"severity": "warning", "area": "compression", "variant": r["name"], "code": "VARIANT_SKIPPED",
             "message": r["skipped"]} for r in skipped_variants(path)]


def _admission_findings(variants) -> list[dict]:
    """Variants the device's model admission would refuse cannot ship: say so up front."""
    from runtime_guard.admission import admit_model
    from runtime_guard.errors import ModelRejected

    out = []
    for v in variants:
        try:
            admit_model(Path(v.path).read_bytes())
        except ModelRejected as e:
            out.append({"severity": "warning", "area": "packaging", "variant": v.name, "code": "ADMISSION_REJECTED",
                        "message": f"{v.name}: the runtime's model admission rejects this variant ({e}); "
                                   "it cannot be packaged"})
    return out


def _findings(checks: list[Check], results: dict, extra: list[dict]) -> list[dict]:
    out = [
        {"severity": "high", "area": c.area, "variant": c.variant, "code": "POLICY_" + c.metric.upper(), "message": c.message}
        for c in checks if c.status == FAIL
    ]
    rob = results.get("robustness") or {}
    for f in rob.get("findings", []):
        out.append({"severity": f["severity"], "area": "robustness", "variant": f.get("variant"), "code": f["code"],
                    "message": f"{f.get('variant') or 'audit'}: {f['message']}"})
    out += extra
    skipped = sorted({c.area for c in checks if c.status == SKIP})
    for area in skipped:
        out.append({"severity": "warning", "area": area, "variant": None, "code": "NOT_MEASURED",
                    "message": f"{area}: some policy checks could not be evaluated (area not run or figure missing)"})
    order = {"high": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda f: order[f["severity"]])


def _verdict(checks: list[Check], names: list[str], allow_skipped: bool = False) -> dict:
    """PASS only when nothing failed and nothing was skipped, unless skipped checks are allowed:
    a check that was not evaluated never passes by default."""
    failed = [c for c in checks if c.status == FAIL]
    skipped = [c for c in checks if c.status == SKIP]
    blocking = failed + ([] if allow_skipped else skipped)
    per = {n: not any(c.variant in (n, None) for c in blocking) for n in names}
    ok = [n for n, p in per.items() if p]
    passing = f"variants passing: {', '.join(ok) if ok else 'none'}"
    if failed:
        headline = f"FAIL: {len(failed)} of {len(checks)} policy checks failed, {len(skipped)} skipped; {passing}"
    elif skipped and not allow_skipped:
        areas = ", ".join(sorted({c.area for c in skipped}))
        headline = (f"INCOMPLETE: {len(skipped)} of {len(checks)} policy checks skipped ({areas} not measured); "
                    "none failed; --allow-skipped accepts a partial review")
    elif skipped:
        headline = (f"PASS (partial): {len(checks) - len(skipped)} policy checks passed, {len(skipped)} skipped "
                    f"and allowed, for {len(names)} variant(s)")
    else:
        headline = f"PASS: all {len(checks)} policy checks passed for {len(names)} variant(s)"
    return {
        "passed": not blocking,
        "total_checks": len(checks),
        "failed_checks": len(failed),
        "skipped_checks": len(skipped),
        "allow_skipped": allow_skipped,
        "variants": per,
        "headline": headline,
    }
