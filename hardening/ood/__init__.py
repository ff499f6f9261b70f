"""OOD and anomaly detection for the on-device gate: fit, calibrate, evaluate, export.

Score convention everywhere: higher = more anomalous.
"""

from hardening.ood.budget import GateBudget
from hardening.ood.calibration import ConformalThreshold, conformal_threshold, false_rejection_rate
from hardening.ood.detectors import (
    DETECTORS,
    Detector,
    EnergyDetector,
    InputKNNDetector,
    KNNDetector,
    MahalanobisDetector,
    MSPDetector,
    PCAReconstructionDetector,
    default_detectors,
)
from hardening.ood.ensemble import DetectorEnsemble
from hardening.ood.evaluate import FamilyMetrics, OODAudit
from hardening.ood.export import export_detectors
from hardening.ood.graph import FeatureEdit, add_feature_output, find_penultimate
from hardening.ood.pipeline import FitReport, audit_ood, fit_ensemble, fit_ood, prepare_model
from hardening.ood.views import ModelViews, compute_views

__all__ = [
    "GateBudget",
    "ConformalThreshold", "conformal_threshold", "false_rejection_rate",
    "DETECTORS", "Detector", "EnergyDetector", "InputKNNDetector", "KNNDetector", "MahalanobisDetector",
    "MSPDetector", "PCAReconstructionDetector", "default_detectors",
    "DetectorEnsemble", "FamilyMetrics", "OODAudit", "export_detectors",
    "FeatureEdit", "add_feature_output", "find_penultimate",
    "FitReport", "audit_ood", "fit_ensemble", "fit_ood", "prepare_model",
    "ModelViews", "compute_views",
]
