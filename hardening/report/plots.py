"""Report figures as base64 PNG (matplotlib Agg: headless, no display needed)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINES = ("-", "--", "-.", ":")


def _style(i: int) -> dict:
    """Distinct marker + dash per series, shrinking markers: identical variants stay visible."""
    return {"marker": MARKERS[i % len(MARKERS)], "ls": LINES[i % len(LINES)], "ms": max(3, 8 - i)}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def robust_accuracy_plot(summary: dict, thresholds: list[dict]) -> str | None:
    """Robust accuracy vs epsilon per variant, Wilson 95% band, policy minima as markers."""
    series = {n: s["robust_accuracy"] for n, s in summary["variants"].items() if s.get("robust_accuracy")}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, pts) in enumerate(series.items()):
        eps = [0.0] + [p["eps"] for p in pts]
        clean = summary["variants"][name].get("clean_accuracy")
        acc = [clean if clean is not None else float("nan")] + [p["robust_accuracy"] for p in pts]
        line, = ax.plot(eps, acc, label=name, **_style(i))
        if all("ci_low" in p for p in pts):
            ax.fill_between([p["eps"] for p in pts], [p["ci_low"] for p in pts], [p["ci_high"] for p in pts],
                            color=line.get_color(), alpha=0.12)
    for j, t in enumerate(thresholds):
        ax.scatter([t["eps"]], [t["min"]], marker="_", s=600, c="red", zorder=5, label="policy minimum" if j == 0 else None)
    ax.set(xlabel="epsilon (L-inf, input units)", ylabel="robust accuracy", ylim=(-0.02, 1.02),
           title="Robust accuracy vs epsilon (worst case over all attacks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def extraction_plot(summary: dict, budget: int, max_fidelity: float) -> str | None:
    series = {n: (s.get("extraction") or {}).get("curve") for n, s in summary["variants"].items()}
    series = {n: c for n, c in series.items() if c}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, curve) in enumerate(series.items()):
        ax.plot([c["queries"] for c in curve], [c["fidelity"] for c in curve], label=name, **_style(i))
    ax.axhline(max_fidelity, ls="--", c="red", lw=1, label=f"policy max fidelity {max_fidelity:.0%}")
    ax.axvline(budget, ls=":", c="grey", lw=1, label=f"policy budget {budget} queries")
    ax.set_xscale("log")
    ax.set(xlabel="attacker queries", ylabel="fidelity (agreement with victim)", ylim=(0, 1.02),
           title="Model extraction: stolen-copy fidelity vs queries")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def auroc_plot(summary: dict, min_auroc: float) -> str | None:
    data = {n: (s.get("ood") or {}).get("auroc") or {} for n, s in summary["variants"].items()}
    data = {n: a for n, a in data.items() if a}
    if not data:
        return None
    fams = sorted({f for a in data.values() for f in a})
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(fams) * max(1, len(data)) / 2.5), 4.2))
    width = 0.8 / len(data)
    for i, (name, a) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(fams))]
        ax.bar(xs, [a.get(f, 0.0) for f in fams], width, label=name)
    ax.axhline(min_auroc, ls="--", c="red", lw=1, label=f"policy minimum {min_auroc:.2f}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fams))], fams, rotation=20)
    lo = min(min(a.values()) for a in data.values())
    ax.set(ylabel="AUROC (ensemble)", ylim=(max(0.0, min(lo, min_auroc) - 0.05), 1.005), title="OOD detection AUROC per family")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def efficiency_plot(summary: dict, budgets: dict) -> str | None:
    names = [n for n, s in summary["variants"].items() if s.get("size_kb") is not None]
    if not names:
        return None
    v = summary["variants"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.bar(names, [v[n]["latency_p95_ms"] or 0 for n in names], color="tab:blue")
    a1.set(ylabel="ms", title="p95 latency, batch 1")
    lat_top = max(v[n]["latency_p95_ms"] or 0 for n in names)
    if budgets.get("max_latency_p95_ms") and budgets["max_latency_p95_ms"] <= 3 * lat_top:
        a1.axhline(budgets["max_latency_p95_ms"], ls="--", c="red", lw=1, label="budget")
        a1.legend(fontsize=8)
    a2.bar(names, [v[n]["size_kb"] for n in names], color="tab:green")
    a2.set(ylabel="KiB", title="model size")
    if budgets.get("max_size_kb") and budgets["max_size_kb"] <= 3 * max(v[n]["size_kb"] for n in names):
        a2.axhline(budgets["max_size_kb"], ls="--", c="red", lw=1, label="budget")
        a2.legend(fontsize=8)
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=25, labelsize=8)
    return _png(fig)
