"""GuardConfig: the runtime policy a bundle carries in its manifest's ``runtime`` dict.

The publisher decides the policy at release time and signs it with the model,
so the device cannot be talked into a weaker policy without breaking the
signature. Parsing is strict (unknown keys, wrong types and out-of-range values
raise ``GuardConfigError``) because a typo that silently disables a check is
worse than a refused bundle. ``to_dict()`` emits plain JSON types so the dict
can go straight into the canonical manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, ClassVar, Self

from . import strict
from .errors import LoadError
from .output_policy import OUTPUT_POLICIES

__all__ = [
    "GuardConfigError",
    "InputSchema",
    "RateLimitConfig",
    "AnomalyGateConfig",
    "OutputPolicyConfig",
    "ExtractionMonitorConfig",
    "TelemetryConfig",
    "GuardConfig",
    "RATE_LIMIT_STRATEGIES",
]

RATE_LIMIT_STRATEGIES = ("moving-window", "fixed-window", "sliding-window-counter")
GATE_ACTIONS = ("off", "flag", "reject")
MONITOR_ACTIONS = ("flag", "throttle")
MONITOR_SPACES = ("input", "features")


class GuardConfigError(LoadError, ValueError):
    """The runtime config is malformed; ``path`` names the offending field."""

    check = "config"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"runtime config: {path}: {message}")
        self.path = path
        self.detail = message


# -- small validators (path is used in error messages) --------------------------------


# The shared strict validators (runtime_guard.strict), refusing with GuardConfigError.
_int = partial(strict.integer, GuardConfigError)
_num = partial(strict.number, GuardConfigError)
_choice = partial(strict.choice, GuardConfigError)
_bool = partial(strict.boolean, GuardConfigError)


def _edges(path: str, v: Any, min_len: int = 1) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or len(v) < min_len:
        raise GuardConfigError(path, f"must be a list of at least {min_len} numbers")
    out = tuple(_num(f"{path}[{i}]", e) for i, e in enumerate(v))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise GuardConfigError(path, "must be strictly increasing")
    return out


def _seq(path: str, v: Any) -> list[Any]:
    if not isinstance(v, (list, tuple)) or not v:
        raise GuardConfigError(path, "must be a non-empty list of numbers")
    return list(v)


def _counts(path: str, v: Any) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        raise GuardConfigError(path, "must be a non-empty list of counts")
    out = tuple(_num(f"{path}[{i}]", c, 0.0) for i, c in enumerate(v))
    if sum(out) <= 0:
        raise GuardConfigError(path, "must not be all zero")
    return out


def _check_rate(path: str, v: Any) -> str | None:
    """A limits rate string such as "100/minute" or "10 per second"; parsed lazily at runtime."""
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise GuardConfigError(path, "must be a limits rate string like '100/minute' or null")
    from limits import parse_many  # light: limits has no heavy deps

    try:
        items = parse_many(v)
    except ValueError:
        raise GuardConfigError(path, f"cannot parse rate {v!r} (expected e.g. '100/minute')") from None
    if len(items) != 1:
        raise GuardConfigError(path, "exactly one rate per scope")
    return v


class _Section:
    """Mixin: strict from_dict / JSON-ready to_dict for flat dataclasses."""

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> Self:
        d = strict.mapping(GuardConfigError, path or cls.__name__, d,
                           (f.name for f in fields(cls)))  # type: ignore[arg-type]
        try:
            return cls(**d)
        except GuardConfigError as e:
            if not path:
                raise
            raise GuardConfigError(f"{path}.{e.path}", e.detail) from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class InputSchema(_Section):
    """What a request tensor must look like before it reaches onnxruntime.

    ``sample_shape`` excludes the batch dim; ``None`` means "take it from the
    model" (dynamic dims in the model stay unchecked). ``value_range`` is the
    range the model was trained on; ``out_of_range`` chooses reject or clip.
    """

    sample_shape: tuple[int, ...] | None = None
    dtype: str = "float32"
    max_batch: int = 64
    value_range: tuple[float, float] | None = None
    out_of_range: str = "reject"
    max_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.sample_shape is not None:
            if not isinstance(self.sample_shape, (list, tuple)) or not self.sample_shape:
                raise GuardConfigError("sample_shape", "must be a non-empty list of positive ints or null")
            shape = tuple(_int(f"sample_shape[{i}]", d, 1) for i, d in enumerate(self.sample_shape))
            object.__setattr__(self, "sample_shape", shape)
        _choice("dtype", self.dtype, ("float32",))
        _int("max_batch", self.max_batch, 1, 1 << 20)
        if self.value_range is not None:
            if not isinstance(self.value_range, (list, tuple)) or len(self.value_range) != 2:
                raise GuardConfigError("value_range", "must be [low, high] or null")
            lo, hi = (_num(f"value_range[{i}]", v) for i, v in enumerate(self.value_range))
            if not lo < hi:
                raise GuardConfigError("value_range", "low must be below high")
            object.__setattr__(self, "value_range", (lo, hi))
        _choice("out_of_range", self.out_of_range, ("reject", "clip"))
        _int("max_bytes", self.max_bytes, 1)


@dataclass(frozen=True)
class RateLimitConfig(_Section):
    """Rates in the ``limits`` string syntax; ``None`` disables that scope.

    The storage backend is not part of the signed policy: it is a deployment
    choice passed to ``GuardedModel(storage_uri=...)``.
    """

    per_client: str | None = "600/minute"
    global_limit: str | None = None
    strategy: str = "moving-window"

    def __post_init__(self) -> None:
        _check_rate("per_client", self.per_client)
        _check_rate("global_limit", self.global_limit)
        _choice("strategy", self.strategy, RATE_LIMIT_STRATEGIES)


@dataclass(frozen=True)
class AnomalyGateConfig(_Section):
    """What to do with inputs the exported OOD detectors call anomalous.

    ``detector_meta`` is passed verbatim to ``AnomalyScorer.from_bytes`` with
    the bundle's ``detectors.npz`` payload.
    """

    action: str = "off"
    detector_meta: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _choice("action", self.action, GATE_ACTIONS)
        if self.detector_meta is not None and not isinstance(self.detector_meta, dict):
            raise GuardConfigError("detector_meta", "must be an object or null")


@dataclass(frozen=True)
class OutputPolicyConfig(_Section):
    """How much of the probability vector a client gets to see.

    ``k`` is used by top_k, ``decimals`` by rounded, ``beta``/``gamma`` by
    reverse_sigmoid (Lee et al. 2019; beta scales, gamma flattens the
    perturbation).
    """

    policy: str = "full"
    k: int = 1
    decimals: int = 2
    beta: float = 1.0  # ART's ReverseSigmoid defaults
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _choice("policy", self.policy, OUTPUT_POLICIES)
        _int("k", self.k, 1)
        _int("decimals", self.decimals, 0, 8)
        _num("beta", self.beta, 0.0, 10.0, open_lo=True)
        _num("gamma", self.gamma, 0.0, 10.0, open_lo=True)


@dataclass(frozen=True)
class ExtractionMonitorConfig(_Section):
    """PRADA (Juuti et al. 2019) per-client extraction detector.

    Memory per client is bounded by ``per_class_history`` stored queries per
    class plus ``max_distances`` floats; at most ``max_clients`` clients are
    tracked (least recently seen is evicted), and the stored queries of all
    clients together stay within ``max_history_mb`` (least recently seen clients
    are evicted first; a client that alone fills it keeps a shorter history). The Shapiro-Wilk test runs every
    ``test_every`` queries once ``min_queries`` distances exist.
    """

    enabled: bool = True
    delta: float = 0.90
    min_queries: int = 50
    max_distances: int = 500
    per_class_history: int = 128
    max_clients: int = 1024
    max_history_mb: float = 64.0
    test_every: int = 10
    action: str = "flag"
    throttle_seconds: float = 600.0
    # With action "throttle": None blocks a flagged client for throttle_seconds; a number shrinks its
    # rate budget instead, to one query per throttle_interval seconds for throttle_seconds.
    throttle_interval: float | None = None
    # Distances are taken on (v - center) / scale when both are given (per value, from the
    # release-time calibration: ``edgeward calibrate-monitor`` writes them), where v is the
    # sanitized input (space "input") or the model's penultimate features (space "features").
    space: str = "input"
    center: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None
    # Complementary per-client signals (None = off), judged from min_queries queries on:
    max_rejection_rate: float | None = None  # share of the client's queries the gate refused
    min_label_entropy: float | None = None  # entropy (bits) of the client's top-1 label histogram

    def __post_init__(self) -> None:
        _bool("enabled", self.enabled)
        _num("delta", self.delta, 0.0, 1.0, open_lo=True)
        if (self.center is None) != (self.scale is None):
            raise GuardConfigError("center", "center and scale go together")
        if self.center is not None and self.scale is not None:
            c = tuple(_num(f"center[{i}]", v) for i, v in enumerate(_seq("center", self.center)))
            sc = tuple(_num(f"scale[{i}]", v, 0.0, open_lo=True) for i, v in enumerate(_seq("scale", self.scale)))
            if len(c) != len(sc):
                raise GuardConfigError("scale", f"has {len(sc)} values, center has {len(c)}")
            object.__setattr__(self, "center", c)
            object.__setattr__(self, "scale", sc)
        if self.max_rejection_rate is not None:
            _num("max_rejection_rate", self.max_rejection_rate, 0.0, 1.0)
        if self.min_label_entropy is not None:
            _num("min_label_entropy", self.min_label_entropy, 0.0, 64.0)
        _int("min_queries", self.min_queries, 3, 5000)
        _int("max_distances", self.max_distances, 3, 5000)
        if self.min_queries > self.max_distances:
            raise GuardConfigError("min_queries", "must not exceed max_distances")
        _int("per_class_history", self.per_class_history, 1, 1 << 16)
        _int("max_clients", self.max_clients, 1, 1 << 24)
        _num("max_history_mb", self.max_history_mb, 0.0, 1 << 20, open_lo=True)
        _int("test_every", self.test_every, 1, 1 << 20)
        _choice("action", self.action, MONITOR_ACTIONS)
        _choice("space", self.space, MONITOR_SPACES)
        _num("throttle_seconds", self.throttle_seconds, 0.0, 7 * 86400.0, open_lo=True)
        if self.throttle_interval is not None:
            _num("throttle_interval", self.throttle_interval, 0.0, 86400.0, open_lo=True)


@dataclass(frozen=True)
class TelemetryConfig(_Section):
    """Aggregate-only telemetry and drift references.

    ``reference_class_counts`` (one per class) and ``reference_ood_counts``
    (one per bin of ``ood_edges``, plus one below the first and one above the
    last edge) come from the release-time calibration data. ``epsilon``: if set,
    Laplace noise of scale 1/epsilon is added to every exported count.
    """

    latency_buckets_ms: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0)
    ood_edges: tuple[float, ...] | None = None
    reference_ood_counts: tuple[float, ...] | None = None
    reference_class_counts: tuple[float, ...] | None = None
    psi_alert: float = 0.25
    epsilon: float | None = None
    # PSI over a handful of samples is noise (8 requests read 2.6 against a 0.25 alert);
    # below this many live samples a family reports only its count ``n``.
    min_samples: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "latency_buckets_ms", _edges("latency_buckets_ms", self.latency_buckets_ms))
        if self.ood_edges is not None:
            object.__setattr__(self, "ood_edges", _edges("ood_edges", self.ood_edges))
        if self.reference_ood_counts is not None:
            if self.ood_edges is None:
                raise GuardConfigError("reference_ood_counts", "needs ood_edges")
            ref = _counts("reference_ood_counts", self.reference_ood_counts)
            if len(ref) != len(self.ood_edges) + 1:
                raise GuardConfigError("reference_ood_counts", "needs len(ood_edges) + 1 entries")
            object.__setattr__(self, "reference_ood_counts", ref)
        if self.reference_class_counts is not None:
            object.__setattr__(
                self, "reference_class_counts", _counts("reference_class_counts", self.reference_class_counts)
            )
        _num("psi_alert", self.psi_alert, 0.0, open_lo=True)
        _int("min_samples", self.min_samples, 1, 10**9)
        if self.epsilon is not None:
            _num("epsilon", self.epsilon, 0.0, 1e6, open_lo=True)


@dataclass(frozen=True)
class GuardConfig:
    """All runtime policy in one signed object; defaults are a safe starting point."""

    input: InputSchema = field(default_factory=InputSchema)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    anomaly: AnomalyGateConfig = field(default_factory=AnomalyGateConfig)
    output: OutputPolicyConfig = field(default_factory=OutputPolicyConfig)
    extraction: ExtractionMonitorConfig = field(default_factory=ExtractionMonitorConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    _SECTIONS: ClassVar[dict[str, type[_Section]]] = {
        "input": InputSchema,
        "rate_limit": RateLimitConfig,
        "anomaly": AnomalyGateConfig,
        "output": OutputPolicyConfig,
        "extraction": ExtractionMonitorConfig,
        "telemetry": TelemetryConfig,
    }

    def __post_init__(self) -> None:
        for name, cls in self._SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise GuardConfigError(name, f"must be a {cls.__name__}")
        if self.output.policy == "adaptive_misinformation" and self.anomaly.action != "flag":
            raise GuardConfigError(
                "output.policy",
                "adaptive_misinformation needs anomaly.action = 'flag' (it answers OOD inputs instead of rejecting)",
            )

    @classmethod
    def from_dict(cls, d: Any) -> GuardConfig:
        """Parse the manifest's ``runtime`` dict (missing sections take defaults)."""
        d = strict.mapping(GuardConfigError, "runtime", d, cls._SECTIONS)
        # each value has its field's type (_SECTIONS pairs them); a dict cannot say so per key
        parts: dict[str, Any] = {name: sec.from_dict(d.get(name), name) for name, sec in cls._SECTIONS.items()}
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the manifest's ``runtime`` field."""
        return {name: getattr(self, name).to_dict() for name in self._SECTIONS}
