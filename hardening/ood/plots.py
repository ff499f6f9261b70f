"""ROC curves per family (PNG, matplotlib Agg backend so it runs headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def roc_plot(family: str, id_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray], alpha: float, path: str | Path) -> Path:
    """One curve per detector; OOD is the positive class; a dotted line marks the target FRR."""
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    for name in id_scores:
        y = np.r_[np.zeros(len(id_scores[name])), np.ones(len(ood_scores[name]))]
        fpr, tpr, _ = roc_curve(y, np.r_[id_scores[name], ood_scores[name]])
        ax.plot(fpr, tpr, lw=2.5 if name == "ensemble" else 1.2, label=name)
    ax.axvline(alpha, ls=":", c="grey", label=f"target FRR {alpha:g}")
    ax.set(xlabel="false-rejection rate (in-distribution)", ylabel="OOD detection rate", title=f"ROC: {family}", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
