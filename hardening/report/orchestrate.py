"""``run_full_audit``: compression -> profiling -> robustness -> extraction -> OOD for every
variant, then policy checks and the three outputs (report.json, report.html, junit.xml).

Every area is someone else's module; this file only sequences them, records the
settings and seeds it passed, and normalises their results (``summary.py``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from hardening.errors import InputError
from hardening.intake import sha256_file
from hardening.jsonio import dumps
from hardening.paths import portable
from hardening.report import summary as S
from hardening.report.checks import FAIL, SKIP, Check, evaluate_policy
from hardening.report.defences import defence_table
from hardening.report.policy import Policy
from hardening.report.schema import SCHEMA_NAME, SCHEMA_VERSION, validate_report

PROFILES = ("quick", "thorough")
AREAS = ("profiling", "robustness", "extraction", "ood")
LIBRARIES = ("numpy", "onnx", "onnxruntime", "torch", "adversarial-robustness-toolbox", "scikit-learn", "scipy",
             "matplotlib", "cryptography", "jsonschema", "typer", "rich")
# Per-profile work sizes; the policy's robustness.n and extraction.budget are added on top.
PROFILE_SETTINGS = {
    "quick": {"profiling_runs": 100, "ood_synthetic": 200, "robustness_n_cap": 64},
    "thorough": {"profiling_runs": 400, "ood_synthetic": 1000, "robustness_n_cap": None},
}

# stage, message, done, total (done/total of the whole audit, in steps)
Progress = Callable[[str, str, int, int], None]


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


class _Steps:
    """Turn area-level progress callbacks into one overall step counter."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def say(self, stage: str, msg: str = "") -> None:
        if self.progress:
            self.progress(stage, msg, self.done, self.total)

    def step(self, stage: str, msg: str = "") -> None:
        self.done += 1
        self.say(stage, msg)


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
) -> AuditOutputs:
    """Audit every variant of ``model`` and write report.json, report.html and junit.xml to ``out_dir``.

    ``variants_file``: use these variants (a ``variants.json``) instead of compressing.
    ``kinds``: compression kinds (default: all; pruning on the ONNX graph without a usable source).
    ``areas``: subset of profiling/robustness/extraction/ood to run (skipped ones show as
    skipped checks, never as passes; the verdict fails on them unless ``allow_skipped``).
    ``sizes``: override the profile's work sizes (keys of ``PROFILE_SETTINGS`` plus
    ``extraction_budgets``), e.g. to keep tests small; recorded in the settings.
    """
    from hardening.compression import KINDS, compress, load_variants
    from hardening.data import load_dataset
    from hardening.intake import check_fits, load_model

    t_all = time.perf_counter()
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose quick or thorough")
    bad = set(areas) - set(AREAS)
    if bad:
        raise InputError(f"unknown area(s) {sorted(bad)}; choose from {', '.join(AREAS)}")
    policy = policy or Policy()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = load_model(model)
    ds = load_dataset(data)
    check_fits(info, ds)
    timings: dict[str, float] = {}
    ps = {**PROFILE_SETTINGS[profile], "extraction_budgets": None}
    unknown_sizes = set(sizes or {}) - set(ps)
    if unknown_sizes:
        raise InputError(f"unknown size override(s) {sorted(unknown_sizes)}; known: {', '.join(ps)}")
    ps.update(sizes or {})

    if variants_file is not None:
        variants = load_variants(variants_file)
        n_variants = len(variants)
    else:
        kinds = kinds or KINDS
        n_variants = len(kinds)
    steps = _Steps(1 + len(areas) * n_variants + 1, progress)

    if variants_file is None:
        steps.say("compression", f"making {len(kinds)} variant(s)")  # type: ignore[arg-type]
        t0 = time.perf_counter()
        variants = compress(model, data, out / "variants", torch_source=torch_source, kinds=kinds)  # type: ignore[arg-type]
        timings["compression_s"] = time.perf_counter() - t0
    steps.step("compression", f"{len(variants)} variant(s)")
    if not variants:
        raise InputError("no variants to audit")
    if torch_source is not None:
        for v in variants:
            v.torch_source = v.torch_source or str(torch_source)
    names = [v.name for v in variants]
    summary = {v.name: S.empty_variant(v.kind) for v in variants}
    extra_findings: list[dict] = _admission_findings(variants)
    results: dict = {a: None for a in AREAS}
    settings_areas: dict[str, dict] = {"sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in ps.items()}}
    artifacts: dict = {}

    if "profiling" in areas:
        from hardening.profiling import Budgets, profile_variants

        t0 = time.perf_counter()
        b = policy.budgets
        budgets = Budgets(b.max_latency_p95_ms, b.max_memory_mb, b.max_size_kb, policy.accuracy.min_clean, b.max_cold_start_ms)
        settings_areas["profiling"] = {"threads": 1, "runs": ps["profiling_runs"], "big_batch": 32}
        rep = profile_variants(variants, ds, budgets, threads=1, runs=ps["profiling_runs"], big_batch=32,
                               progress=lambda n: steps.step("profiling", f"profiled {n}"))
        results["profiling"] = rep.to_dict()
        S.add_profiling(summary, results["profiling"])
        timings["profiling_s"] = time.perf_counter() - t0

    if "robustness" in areas:
        from hardening.robustness import run_robustness_audit

        t0 = time.perf_counter()
        n = policy.robustness.n if ps["robustness_n_cap"] is None else min(policy.robustness.n, ps["robustness_n_cap"])
        rs = {"profile": profile, "eps": policy.eps, "norm": policy.robustness.norm, "n": n, "seed": seed}
        settings_areas["robustness"] = rs
        base = steps.done

        def rprog(msg: str, done: int, total: int) -> None:
            # each variant's cascade ends with "<variant> done": one overall step per variant
            (steps.step if msg.endswith(" done") else steps.say)("robustness", msg)

        rep = run_robustness_audit(variants, ds, torch_source=torch_source, progress=rprog, **rs)
        steps.done = max(steps.done, base + len(variants))
        results["robustness"] = rep.to_dict()
        S.add_robustness(summary, results["robustness"])
        timings["robustness_s"] = time.perf_counter() - t0

    if "extraction" in areas:
        t0 = time.perf_counter()
        results["extraction"], settings_areas["extraction"], f = _run_extraction(
            variants, ds, torch_source, policy, profile, seed, steps, ps["extraction_budgets"])
        extra_findings += f
        for name, ext in (results["extraction"] or {}).get("variants", {}).items():
            curve, attack = S.worst_extraction_curve(ext, policy.extraction.victim)
            summary[name]["extraction"] = S.extraction_figures(curve, policy.extraction.budget, policy.extraction.target_fidelity, attack)
        timings["extraction_s"] = time.perf_counter() - t0

    if "ood" in areas:
        from hardening.ood import audit_ood, fit_ood

        t0 = time.perf_counter()
        os_ = {"alpha": policy.ood.alpha, "frr_slack": policy.ood.frr_slack, "frr_delta": policy.ood.frr_delta,
               "n_synthetic": ps["ood_synthetic"], "seed": seed, "detector": "ensemble"}
        settings_areas["ood"] = os_
        results["ood"] = {"variants": {}}
        artifacts["detectors"] = {}
        artifacts["roc_plots"] = {}
        for v in variants:
            steps.say("ood", f"{v.name}: fitting detectors")
            det_dir = out / "detectors" / v.name
            fit = fit_ood(v.path, data, det_dir, alpha=policy.ood.alpha, seed=seed,
                          slack=policy.ood.frr_slack, delta=policy.ood.frr_delta)
            adaptive = _adaptive_evasion(v, variants, ds, det_dir, policy, profile, seed, steps)
            adv = max(adaptive.adversarial_examples.items()) if adaptive is not None else None
            audit = audit_ood(v.path, data, det_dir, out / "ood" / v.name, n_synthetic=ps["ood_synthetic"], seed=seed,
                              adversarial=adv[1] if adv is not None and len(adv[1]) else None,
                              adversarial_name=f"{S.ADAPTIVE_FAMILY}{adv[0]:g}" if adv is not None else "adversarial",
                              progress=lambda m, v=v: steps.say("ood", f"{v.name}: {m}"))
            d = audit.to_dict()
            d["fit"] = fit.to_dict()
            d["adaptive_evasion"] = adaptive.to_dict() if adaptive is not None else None
            d["plots"] = [os.path.relpath(p, out) for p in d["plots"]]
            results["ood"]["variants"][v.name] = d
            artifacts["detectors"][v.name] = os.path.relpath(det_dir, out)
            artifacts["roc_plots"][v.name] = d["plots"]
            S.add_ood(summary, v.name, d)
            steps.step("ood", f"{v.name} done")
        timings["ood_s"] = time.perf_counter() - t0

    ref = next((v.name for v in variants if v.kind == "float"), None)
    summ = {"reference": ref, "reference_clean_accuracy": summary[ref]["clean_accuracy"] if ref else None, "variants": summary}
    ran = {a: a in areas for a in AREAS}
    checks = evaluate_policy(summ, policy, ran)
    findings = _findings(checks, results, extra_findings)
    verdict = _verdict(checks, names, allow_skipped)
    timings["total_s"] = time.perf_counter() - t_all
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
        "settings": {"profile": profile, "seed": seed, "policy": policy.to_dict(), "areas": settings_areas},
        "variants": [
            {"name": v.name, "kind": v.kind, "parent": v.parent, "path": portable(v.path, out), "sha256": v.sha256,
             "size_bytes": Path(v.path).stat().st_size, "recipe": v.recipe}
            for v in variants
        ],
        "summary": summ,
        "defences": defence_table(summ, policy.to_dict()),
        "results": results,
        "checks": [c.to_dict() for c in checks],
        "findings": findings,
        "verdict": verdict,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "artifacts": artifacts,
    }
    report = json.loads(dumps(report))  # plain JSON types (numpy scalars, tuples) before validation
    validate_report(report, "generated report")
    steps.say("report", "writing report.json, report.html, junit.xml")
    paths = write_outputs(report, out)
    steps.step("report", "done")
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


ADAPTIVE_N = {"quick": 32, "thorough": None}  # cap on evaluation points (None: the policy's robustness.n)


def _adaptive_evasion(v, variants, ds, det_dir, policy: Policy, profile: str, seed: int, steps: _Steps):
    """Gate-aware evasion of one variant through its fitted gate (the float reference only in
    quick profiles, every variant in thorough ones); None when skipped."""
    ref = next((x.name for x in variants if x.kind == "float"), variants[0].name)
    if profile == "quick" and v.name != ref:
        return None
    from hardening.guarded_audit import run_guarded_audit

    cap = ADAPTIVE_N.get(profile)
    n = policy.robustness.n if cap is None else min(policy.robustness.n, cap)
    steps.say("ood", f"{v.name}: attacks that know the gate")
    return run_guarded_audit(v.path, ds, det_dir, torch_source=v.torch_source, eps=policy.eps, n=n,
                             profile=profile, seed=seed, progress=lambda m: steps.say("ood", f"{v.name}: {m}"))


def _run_extraction(variants, ds, torch_source, policy: Policy, profile: str, seed: int, steps: _Steps, budgets=None):
    """Extraction audit per variant: an attacker with in-distribution data steals the
    deployed artifact (undefended outputs) at budgets bracketing the policy budget."""
    try:
        from hardening.extraction_audit import run_extraction_audit
    except ImportError:
        for _ in variants:
            steps.step("extraction", "extraction audit not available")
        return None, {"available": False}, [{
            "severity": "warning", "area": "extraction", "variant": None, "code": "EXTRACTION_UNAVAILABLE",
            "message": "extraction audit module (hardening.extraction_audit) is not installed; extraction checks skipped"}]
    kw = _extraction_kwargs(policy, profile, seed, budgets)
    out: dict = {"variants": {}}
    findings: list[dict] = []
    for v in variants:
        steps.say("extraction", f"{v.name}: stealing")
        rep = run_extraction_audit(v.path, ds, torch_source=torch_source or v.torch_source, **kw,
                                   progress=lambda d, t, m, v=v: steps.say("extraction", f"{v.name}: {m} ({d}/{t})"))
        d = rep.to_dict()
        out["variants"][v.name] = d
        sc = d.get("self_check") or {}
        if sc and not sc.get("passed", True):
            findings.append({"severity": "high", "area": "extraction", "variant": v.name, "code": "EXTRACTION_SELF_CHECK",
                             "message": f"{v.name}: extraction harness self-check failed ({sc.get('message')}); "
                                        "extraction figures understate the risk"})
        steps.step("extraction", f"{v.name} done")
    return out, {**kw, "budgets": list(kw["budgets"])}, findings


def _extraction_kwargs(policy: Policy, profile: str, seed: int, budgets=None) -> dict:
    from hardening.extraction_audit import DEFAULT_BUDGETS, QUICK_BUDGETS

    grid = budgets or (QUICK_BUDGETS if profile == "quick" else DEFAULT_BUDGETS)
    budgets = sorted({*grid, policy.extraction.budget, policy.extraction.min_queries_to_steal})
    return {
        "budgets": tuple(budgets),
        "scenarios": ("in_dist",) if profile == "quick" else ("in_dist", "natural_ood", "noise"),
        "policies": tuple(dict.fromkeys(("bare", policy.extraction.victim))),
        "attacks": ("knockoff_random",) if profile == "quick" else ("copycat", "knockoff_random"),
        "train_steps": 150 if profile == "quick" else 300,
        "seed": seed,
    }
