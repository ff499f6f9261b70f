"""Detection metrics per family and detector (scikit-learn metrics).

OOD is the **positive** class for AUROC and AUPR-out; AUPR-in treats
in-distribution as positive (with negated scores). ``accepted_at_frr`` is the
fraction of OOD inputs the calibrated gate lets through, i.e. scoring at or below
the threshold calibrated for the stated in-distribution false-rejection rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class FamilyMetrics:
    family: str
    detector: str
    n_ood: int
    auroc: float
    aupr_in: float
    aupr_out: float
    accepted_at_frr: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OODAudit:
    alpha: float
    threshold: float | None
    n_id: int
    id_frr: dict[str, float]  # achieved false-rejection rate on the in-distribution eval split
    metrics: list[FamilyMetrics] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "threshold": self.threshold,
            "n_id": self.n_id,
            "id_frr": self.id_frr,
            "metrics": [m.to_dict() for m in self.metrics],
            "plots": self.plots,
            "convention": "OOD is the positive class; accepted_at_frr = share of OOD scoring <= threshold",
        }

    def get(self, family: str, detector: str = ENSEMBLE) -> FamilyMetrics:
        return next(m for m in self.metrics if m.family == family and m.detector == detector)

    @property
    def families(self) -> list[str]:
        return list(dict.fromkeys(m.family for m in self.metrics))

    @property
    def detectors(self) -> list[str]:
        return list(dict.fromkeys(m.detector for m in self.metrics))


def family_metrics(family: str, detector: str, id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float) -> FamilyMetrics:
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    return FamilyMetrics(
        family=family,
        detector=detector,
        n_ood=int(len(ood_scores)),
        auroc=float(roc_auc_score(y, s)),
        aupr_in=float(average_precision_score(1 - y, -s)),
        aupr_out=float(average_precision_score(y, s)),
        accepted_at_frr=float(np.mean(ood_scores <= threshold)),
    )
