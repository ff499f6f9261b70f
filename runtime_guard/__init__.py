"""edgeward on-device runtime: signed bundles, admission, and the guarded predict path.

Exports are resolved lazily so ``import runtime_guard`` stays cheap and never
pulls anything beyond numpy / onnxruntime / cryptography / limits (and only
when the symbol is used). torch, ART and scikit-learn are never imported here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GuardedModel": "guard",
    "PredictionResult": "guard",
    "GuardConfig": "config",
    "GuardConfigError": "config",
    "InputSchema": "config",
    "RateLimitConfig": "config",
    "AnomalyGateConfig": "config",
    "OutputPolicyConfig": "config",
    "ExtractionMonitorConfig": "config",
    "TelemetryConfig": "config",
    "SanitizerError": "sanitizer",
    "GuardError": "errors",
    "LoadError": "errors",
    "RequestError": "errors",
    "BundleError": "errors",
    "ModelRejected": "errors",
    "PartsMismatch": "errors",
    "Verdict": "verdict",
    "Decision": "verdict",
    "Reason": "verdict",
    "Stage": "verdict",
    "RateLimitStatus": "ratelimit",
    "MonitorState": "extraction_monitor",
    "shapiro_wilk": "extraction_monitor",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # "X as X": explicit re-exports for type checkers and linters
    from .config import AnomalyGateConfig as AnomalyGateConfig
    from .config import ExtractionMonitorConfig as ExtractionMonitorConfig
    from .config import GuardConfig as GuardConfig
    from .config import GuardConfigError as GuardConfigError
    from .config import InputSchema as InputSchema
    from .config import OutputPolicyConfig as OutputPolicyConfig
    from .config import RateLimitConfig as RateLimitConfig
    from .config import TelemetryConfig as TelemetryConfig
    from .errors import BundleError as BundleError
    from .errors import GuardError as GuardError
    from .errors import LoadError as LoadError
    from .errors import ModelRejected as ModelRejected
    from .errors import PartsMismatch as PartsMismatch
    from .errors import RequestError as RequestError
    from .extraction_monitor import MonitorState as MonitorState
    from .extraction_monitor import shapiro_wilk as shapiro_wilk
    from .guard import GuardedModel as GuardedModel
    from .guard import PredictionResult as PredictionResult
    from .ratelimit import RateLimitStatus as RateLimitStatus
    from .sanitizer import SanitizerError as SanitizerError
    from .verdict import Decision as Decision
    from .verdict import Reason as Reason
    from .verdict import Stage as Stage
    from .verdict import Verdict as Verdict


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'runtime_guard' has no attribute {name!r}")
    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
