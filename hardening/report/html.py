"""``report.html``: one self-contained page for a reviewer (no network: CSS inline, plots
as base64 PNG). Order: verdict, findings by severity, variants at a glance, then one
section per area with its plot, then provenance."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from hardening.report import plots

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6rem;margin:0 0 4px}h2{margin-top:32px;border-bottom:2px solid #dde1e8;padding-bottom:4px}
.meta{color:#5b6473;font-size:.9rem}
.verdict{border-radius:8px;padding:16px 20px;margin:16px 0;font-size:1.15rem;font-weight:600;color:#fff}
.verdict.pass{background:#1f8a4c}.verdict.fail{background:#c0392b}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.88rem;margin:8px 0}
th,td{border:1px solid #dde1e8;padding:5px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}th{background:#eef1f5}
td code{word-break:break-all}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sev{font-weight:700;border-radius:4px;padding:1px 6px;color:#fff;font-size:.78rem;text-transform:uppercase}
.sev.high{background:#c0392b}.sev.warning{background:#d68910}.sev.info{background:#5d6d7e}
.st{font-weight:700}.st.pass{color:#1f8a4c}.st.fail{color:#c0392b}.st.skip{color:#7f8c8d}
figure{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:8px;margin:12px 0;display:inline-block}
figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.82rem;color:#5b6473}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{max-width:340px}
details{margin:8px 0}pre{background:#fff;border:1px solid #dde1e8;padding:8px;overflow:auto;font-size:.78rem}
"""


def _e(v) -> str:
    return escape("-" if v is None else str(v))


def _f(v, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}g}"


def _img(b64: str | None, alt: str, caption: str) -> str:
    if not b64:
        return f"<p class='meta'>No data for: {_e(alt)}.</p>"
    return (f"<figure><img alt='{_e(alt)}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _td(v: str, num: bool = False) -> str:
    return f"<td class='num'>{v}</td>" if num else f"<td>{v}</td>"


def _stages(report: dict) -> str:
    """Where the time and memory went: one row per stage (and variant)."""
    prov = report.get("provenance") or {}
    stages = prov.get("stages") or []
    if not stages:
        return ""
    ex = prov.get("executor") or {}
    rows = [[_td(_e(r["stage"])), _td(_e(r["variant"] or "all")), _td(f"{r['seconds']:.1f}", True),
             _td(_e(r["peak_rss_mb"]), True), _td(_e(r.get("tree_peak_rss_mb")), True)] for r in stages]
    note = (f"<p class='meta'>Executor {_e(ex.get('name'))} ({_e(ex.get('workers'))} worker(s)). A variant's share of "
            "a sharded stage is its shards' compute time, so under parallel workers the shares can add up to more "
            "than the stage's wall time; peak RSS is the largest single process that did the work (this one, a "
            "child or a worker), and the tree's is this process and its children together.</p>")
    return note + _table(["stage", "variant", "seconds", "peak RSS (MB)", "with children (MB)"], rows)


def _findings(report: dict) -> str:
    fs = report["findings"]
    if not fs:
        return "<p>No findings.</p>"
    counts = {s: sum(f["severity"] == s for f in fs) for s in ("high", "warning", "info")}
    rows = [[_td(f"<span class='sev {f['severity']}'>{_e(f['severity'])}</span>"), _td(_e(f["area"])),
             _td(_e(f["variant"])), _td(_e(f["message"])), _td(f"<code>{_e(f['code'])}</code>")] for f in fs]
    return (f"<p>{counts['high']} high, {counts['warning']} warning, {counts['info']} info.</p>"
            + _table(["severity", "area", "variant", "finding", "code"], rows))


def _overview(report: dict) -> str:
    sv = report["summary"]["variants"]
    eps = sorted({p["eps"] for s in sv.values() for p in s.get("robust_accuracy") or []})
    head = ["variant", "kind", "verdict", "size KiB", "clean acc"] + [f"robust @{e:g}" for e in eps] + [
        "min OOD AUROC", "extraction fidelity @budget", "queries to steal", "p95 ms"]
    rows = []
    for name, s in sv.items():
        ok = report["verdict"]["variants"].get(name)
        ra = {p["eps"]: p["robust_accuracy"] for p in s.get("robust_accuracy") or []}
        ex = s.get("extraction") or {}
        rows.append([
            _td(f"<b>{_e(name)}</b>"), _td(_e(s["kind"])),
            _td(f"<span class='st {'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}</span>"),
            _td(_f(s.get("size_kb"), digits=4), True), _td(_f(s.get("clean_accuracy"), True), True),
            *[_td(_f(ra.get(e), True) + ("&nbsp;(upper bound)" if s.get("robust_upper_bound") and e in ra else ""),
                  True) for e in eps],
            _td(_f((s.get("ood") or {}).get("min_auroc")), True),
            _td(_f(ex.get("fidelity_at_budget"), True), True),
            _td(_e(_steal(ex)), True),
            _td(_f(s.get("latency_p95_ms")), True),
        ])
    return _table(head, rows)


def _steal(ex: dict) -> str | None:
    """Queries to steal as the budgets prove it: "<= 50", "201-500", "> 500"."""
    q, bound = ex.get("queries_to_steal"), ex.get("steal_bound")
    if bound == "not_reached":
        return f"> {ex['max_queries']:.0f}"
    if bound == "at_most":
        return f"<= {q:.0f}"
    if bound == "between":
        return f"{ex['queries_survived'] + 1:.0f}-{q:.0f}"
    return None


def _checks(report: dict) -> str:
    rows = []
    for c in sorted(report["checks"], key=lambda c: {"fail": 0, "skip": 1, "pass": 2}[c["status"]]):
        rows.append([_td(f"<span class='st {c['status']}'>{c['status'].upper()}</span>"), _td(f"<code>{_e(c['id'])}</code>"),
                     _td(_f(c["value"]), True), _td(f"{_e(c['op'])} {_f(c['threshold'])}"), _td(_e(c["message"]))])
    return _table(["status", "check", "value", "policy", "detail"], rows)


def _roc_images(report: dict, base_dir: Path | None) -> str:
    plots_by_variant = (report.get("artifacts") or {}).get("roc_plots") or {}
    ref = report["summary"].get("reference") or next(iter(plots_by_variant), None)
    files = plots_by_variant.get(ref) or []
    figs = []
    for rel in files:
        p = Path(rel) if base_dir is None else Path(base_dir) / rel
        if p.is_file():
            b64 = base64.b64encode(p.read_bytes()).decode("ascii")
            figs.append(_img(b64, f"ROC {p.stem}", f"{ref}: {p.stem.replace('roc_', 'ROC, family ')}"))
    if not figs:
        return ""
    return f"<h3>ROC curves ({_e(ref)} variant, every detector)</h3><div class='grid'>{''.join(figs)}</div>"


def _defences(report: dict) -> str:
    rows = []
    for r in report.get("defences") or []:
        cost = r.get("benign_cost") or {}
        rows.append([_td(_e(r["defence"])), _td(_e(r["attacker"])), _td(_e(r["threat"])),
                     _td("adaptive" if r["adaptive"] else "non-adaptive"), _td(_e(r["metric"])),
                     _td(_f(r.get("without_defence")), True), _td(_f(r.get("with_defence")), True),
                     _td(_e(f"{cost.get('metric')} {_f(cost.get('value'))}") if cost else "-"),
                     _td(_e(r["note"]) if r["measured"] else f"<b>not measured</b>: {_e(r['note'])}")])
    if not rows:
        return "<p>No defence figures in this report.</p>"
    return _table(["defence", "attacker", "threat", "attacker kind", "metric", "without", "with", "benign cost", "note"],
                  rows)


def render_html(report: dict, base_dir: str | Path | None = None) -> str:
    """The page as a string; ``base_dir`` is where the report's artifact paths are relative to."""
    from hardening.report.pareto_section import render_section

    v = report["verdict"]
    pol = report["settings"]["policy"]
    sv = report["summary"]
    model = report["inputs"]["model"]
    rob = report["results"].get("robustness") or {}
    sec_rob = _img(plots.robust_accuracy_plot(sv, pol["robustness"]["min_robust_accuracy"]), "robust accuracy vs epsilon",
                   f"Attacks: every family that reaches each variant (profile {report['settings']['profile']}); "
                   f"{rob.get('n', '?')} points per variant; band = Wilson 95% interval; red marks = policy minima.")
    ext = pol["extraction"]
    sec_ext = _img(plots.extraction_plot(sv, ext["budget"], ext["max_fidelity"]), "extraction fidelity vs queries",
                   "Best fidelity any extraction attack reached at each query budget (unprotected output).")
    sec_ood = _img(plots.auroc_plot(sv, pol["ood"]["min_auroc"]), "OOD AUROC per family",
                   "Fused detector ensemble, scored with the exported runtime scorer.") + _roc_images(report, base_dir)
    sec_eff = _img(plots.efficiency_plot(sv, pol["budgets"]), "latency and size",
                   "Measured with onnxruntime, 1 intra-op thread; each variant in a fresh process.")
    libs = ", ".join(f"{k} {val}" for k, val in report["environment"]["libraries"].items() if val)
    inputs_rows = [[_td(_e(k)), _td(_e(f["path"])), _td(f"<code>{_e(f['sha256'])}</code>")]
                   for k, f in report["inputs"].items() if f]
    inputs_rows += [[_td(_e("variant " + x["name"])), _td(_e(x["path"])), _td(f"<code>{_e(x['sha256'])}</code>")]
                    for x in report["variants"]]
    settings = json.dumps(report["settings"], indent=2)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>edgeward security review: {_e(Path(model['path']).name)}</title><style>{CSS}</style></head>
<body><main>
<h1>Security review: {_e(Path(model['path']).name)}</h1>
<div class="meta">model sha256 <code>{_e(model['sha256'][:16])}…</code> · profile {_e(report['settings']['profile'])} ·
seed {_e(report['settings']['seed'])} · generated {_e(report['created_at'])} · schema {_e(report['schema_version'])} ·
{_e(report['timings'].get('total_s'))} s</div>
<div class="verdict {'pass' if v['passed'] else 'fail'}" id="verdict">{_e(v['headline'])}</div>
<h2 id="findings">Findings by severity</h2>{_findings(report)}
<h2 id="variants">Variants at a glance</h2>{_overview(report)}
<h2 id="defences">Defences against attackers who know them</h2>{_defences(report)}
<h2 id="robustness">Adversarial robustness</h2>{sec_rob}
<h2 id="extraction">Model extraction</h2>{sec_ext}
<h2 id="ood">Out-of-distribution detection</h2>{sec_ood}
<h2 id="efficiency">Latency and size</h2>{sec_eff}
<h2 id="pareto">Pareto front and parent comparison</h2>{render_section(report)}
<h2 id="checks">All policy checks</h2>
<details {'open' if not v['passed'] else ''}><summary>{v['total_checks']} checks: {v['failed_checks']} failed,
{v['skipped_checks']} skipped</summary>{_checks(report)}</details>
<h2 id="provenance">Provenance</h2>
{_table(['input', 'path', 'sha256'], inputs_rows)}
{_stages(report)}
<p class="meta">Python {_e(report['environment']['python'])} on {_e(report['environment']['platform'])}, {_e(report['environment']['cpus'])} CPUs. {_e(libs)}.</p>
<details><summary>Settings, seeds and policy</summary><pre>{_e(settings)}</pre></details>
</main></body></html>
"""
