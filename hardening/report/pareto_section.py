"""The report's Pareto section: every candidate with its recipe, its change against its
parent under the same audits, the front (``hardening.pareto``) and a plot of it."""

from __future__ import annotations

import html

from hardening.pareto import OBJECTIVES, Candidate, candidates
from hardening.report.plots import _png, plt


def pareto_plot(cands: list[Candidate], eps: float | None) -> str | None:
    """Size vs robust accuracy, marker area ~ clean accuracy; the front joined and labelled."""
    pts = [c for c in cands if c.metrics["size_kb"] is not None and c.metrics["robust_accuracy"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for c in pts:
        acc = c.metrics["clean_accuracy"] or 0.0
        ax.scatter(c.metrics["size_kb"], c.metrics["robust_accuracy"], s=30 + 200 * acc ** 4,
                   c="tab:red" if c.on_front else "tab:gray", marker="o" if c.robust_trusted else "x", zorder=3)
        ax.annotate(c.name, (c.metrics["size_kb"], c.metrics["robust_accuracy"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    front = sorted((c for c in pts if c.on_front), key=lambda c: c.metrics["size_kb"])
    if len(front) > 1:
        ax.plot([c.metrics["size_kb"] for c in front], [c.metrics["robust_accuracy"] for c in front],
                c="tab:red", lw=1, ls="--", label="Pareto front (all objectives)")
        ax.legend(fontsize=8)
    ax.set(xlabel="size (KiB)", ylabel=f"robust accuracy @ eps {eps:g}" if eps is not None else "robust accuracy",
           title="candidates: red = on the front, x = robust figure not trusted")
    ax.grid(alpha=0.3)
    return _png(fig)


def _fmt(k: str, v) -> str:
    if v is None:
        return "–"
    if k in ("clean_accuracy", "robust_accuracy"):
        return f"{100 * v:.1f}%"
    return f"{v:.4g}"


def _delta(k: str, v) -> str:
    if v is None:
        return ""
    return f" ({100 * v:+.1f} pt)" if k in ("clean_accuracy", "robust_accuracy") else f" ({v:+.3g})"


def render_section(report: dict) -> str:
    cands, eps = candidates(report)
    img = pareto_plot(cands, eps)
    head = ["variant", "recipe", "parent", *[OBJECTIVES[k][1] for k in OBJECTIVES], "front", "policy"]
    rows = []
    for c in cands:
        cells = [c.name, c.recipe or c.kind, c.parent or "–"]
        cells += [_fmt(k, c.metrics[k]) + _delta(k, c.delta_vs_parent.get(k)) for k in OBJECTIVES]
        cells += ["yes" if c.on_front else "", "pass" if c.passed else "fail"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>")
    pic = f'<figure><img alt="Pareto front" src="data:image/png;base64,{img}"></figure>' if img else ""
    return (pic + table + '<p class="meta">Front over clean and robust accuracy (policy epsilon), p95 latency, size, '
            "memory and queries to steal (proven lower bound); a robust figure flagged as an upper bound counts as "
            "unmeasured. Brackets: change against the parent under the same audits. "
            "<code>edgeward select report.json</code> picks from it.</p>")
