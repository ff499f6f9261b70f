"""Save a fitted ensemble without pickle: float arrays in ``.npz`` plus a JSON description.

The runtime (``runtime_guard.anomaly.AnomalyScorer``) reads exactly this.
"""

from __future__ import annotations

import io
import math

import numpy as np
from sklearn.exceptions import NotFittedError

from hardening.ood.ensemble import DetectorEnsemble
from runtime_guard.anomaly import FORMAT, AnomalyScorer


def _num(v: float) -> float | None:
    return None if math.isinf(v) else float(v)


def export_detectors(ensemble: DetectorEnsemble, model: dict | None = None) -> tuple[bytes, dict]:
    """(npz bytes, JSON-able meta). ``model`` records which outputs/inputs feed the detectors."""
    if not hasattr(ensemble, "threshold_"):
        raise NotFittedError("ensemble must be fitted, normalised and calibrated before export")
    arrays: dict[str, np.ndarray] = {}
    dets = []
    for name, det in ensemble.detectors.items():
        arrs, params = det.export()
        for key, arr in arrs.items():
            arrays[f"{name}__{key}"] = np.ascontiguousarray(arr, dtype=np.float32)
        cal = det.calibration_
        dets.append({
            "name": name,
            "kind": det.kind,
            "view": det.view,
            "width": int(det.n_features_in_),
            "params": params,
            "arrays": sorted(arrs),
            "norm": {"mean": ensemble.norm_mean_[name], "std": ensemble.norm_std_[name]},
            "threshold": _num(cal.threshold),
            "fused": name in ensemble.fused,
        })
    view_meta, view_arrays = ensemble.input_view.to_meta()
    arrays.update(view_arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # plain float arrays; loaded with allow_pickle=False
    cal = ensemble.calibration_
    meta = {
        "format": FORMAT,
        "score_convention": "higher = more anomalous; anomalous if score > threshold",
        "detectors": dets,
        "input_view": view_meta,
        "fusion": {"rule": ensemble.rule, "members": list(ensemble.fused)},
        "threshold": _num(cal.threshold),
        "alpha": cal.alpha,
        "calibration": {"k": cal.k, "n": cal.n, "method": "pac_conformal", "slack": cal.slack, "delta": cal.delta,
                        "frr_bound": cal.frr_bound},
        "needs": sorted({d["view"] for d in dets}),
        "model": model or {},
    }
    data = buf.getvalue()
    scorer = AnomalyScorer.from_bytes(data, meta)  # refuse to write what the runtime cannot read
    meta["budget"] = ensemble.budget.to_meta(scorer.work)
    return data, meta
