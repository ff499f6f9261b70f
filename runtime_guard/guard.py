"""GuardedModel: one ``predict`` call that runs every runtime defence in order.

rate limit -> sanitizer -> onnxruntime (the model and the anomaly gate in one run: the
gate's nodes are appended to the admitted model, ``AnomalyScorer.extension``) -> output
policy -> extraction monitor -> telemetry. Cheap refusals come first so abusive traffic
costs the device as little as possible; the model runs on exactly the array the
sanitizer returned, so valid inputs give bit-identical logits to a bare
``InferenceSession.run``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import GuardConfig
from .errors import InvalidClientId, ModelRejected, PartsMismatch
from .extraction_monitor import ExtractionMonitor, MonitorState
from .gate_graph import GATE_OUTPUTS, tensor_dims
from .golden import GoldenSet, read_golden
from .output_policy import OutputPolicy
from .ratelimit import RateLimiter, RateLimitStatus
from .sanitizer import Sanitizer, SanitizerError
from .telemetry import Telemetry
from .verdict import ACCEPTED, Decision, Reason, Stage, Verdict

if TYPE_CHECKING:
    from collections.abc import Callable

    import onnx
    import onnxruntime as ort

    from .admission import AdmissionLimits, Extension
    from .anomaly import AnomalyScorer
    from .deadline import Deadline

__all__ = ["GuardedModel", "PredictionResult"]

MAX_CLIENT_ID_LEN = 256
_clock = time.perf_counter
DETECTORS_PAYLOAD = "detectors.npz"


@dataclass(slots=True)
class PredictionResult:
    """Outcome of one guarded request: its ``verdict`` and, if answered, the answer.

    ``labels``/``scores`` are None when the request was refused. ``scores`` are
    [N, C] after the output policy. ``logits`` are the raw model outputs for
    in-process callers (audits, tests); ``to_dict()`` never includes them.
    """

    verdict: Verdict
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    ood_scores: np.ndarray | None = None
    latency_s: float = 0.0
    retry_after: float | None = None
    rate_limit: RateLimitStatus | None = None
    logits: np.ndarray | None = field(default=None, repr=False)

    @property
    def decision(self) -> Decision:
        return self.verdict.decision

    @property
    def reasons(self) -> list[Reason]:
        return list(self.verdict.reasons)

    @property
    def ok(self) -> bool:
        """True when an answer was produced (accepted or flagged)."""
        return self.labels is not None

    @property
    def label(self) -> int | None:
        """Top-1 label of the first (often only) sample."""
        return None if self.labels is None else int(self.labels[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view for an API (no logits)."""
        return {
            "decision": self.verdict.decision.value,
            "reasons": [r.value for r in self.verdict.reasons],
            "labels": None if self.labels is None else self.labels.tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "ood_scores": None if self.ood_scores is None else self.ood_scores.tolist(),
            "latency_ms": self.latency_s * 1e3,
            "retry_after": self.retry_after,
        }


def _roles(names: list[str]) -> tuple[str, str | None]:
    """(logits, features) among a model's output names, same convention as release-time
    intake: an output named "features" (else the second output) is features, the other
    first output is logits."""
    if not names:
        raise ModelRejected("model has no outputs", check="outputs")
    feats = "features" if "features" in names else (names[1] if len(names) > 1 else None)
    logits = next((n for n in names if n != feats), None)
    if logits is None:
        raise ModelRejected("model has no logits output (its only output is 'features')",
                            check="outputs")
    return logits, feats


def _one_input(n: int) -> None:
    if n != 1:
        raise ModelRejected(f"model must have exactly one input, has {n}", check="inputs")


def _outputs(outputs: "list[tuple[str, Any]]") -> tuple[str, str | None, int]:
    """(logits, features, classes) from a model's (name, shape) outputs (``_roles``), the
    logits shaped [N, C] with a fixed C; the gate's own outputs are not the model's.

    A signed model can still have any outputs at all (a scalar, only
    ``features``); each such shape is refused here as ``ModelRejected`` with
    check ``outputs`` rather than failing later as an IndexError.
    """
    outs = [(name, shape) for name, shape in outputs if name not in GATE_OUTPUTS]
    logits, feats = _roles([name for name, _ in outs])
    shape = dict(outs)[logits]
    if not isinstance(shape, (list, tuple)) or len(shape) != 2:
        raise ModelRejected(f"logits output {logits!r} must be [N, C], has shape {shape}",
                            check="outputs")
    n_classes = shape[-1]
    if not isinstance(n_classes, int) or n_classes < 1:
        raise ModelRejected("model logits must have a fixed number of classes", check="outputs")
    return logits, feats, n_classes


class GuardedModel:
    """An ONNX classifier wrapped in the runtime defences of a ``GuardConfig``.

    ``model`` is ONNX bytes (they go through admission checks first), a loader that
    makes the session given an admission ``Extension`` (``load``'s streamed bundle), or, for
    a guard without an anomaly gate, an ``onnxruntime.InferenceSession``: a gate runs inside
    the model's own session, so a gated guard makes it. ``storage_uri`` picks the rate-limit
    storage (``memory://`` or e.g. ``redis://127.0.0.1:6379``).
    """

    def __init__(
        self,
        model: "ort.InferenceSession | bytes | Callable[[Extension | None], ort.InferenceSession]",
        config: GuardConfig | None = None,
        anomaly: "AnomalyScorer | None" = None,
        storage_uri: str = "memory://",
        *,
        admission_limits: "AdmissionLimits | None" = None,
        threads: int = 1,
        deadline: "Deadline | None" = None,
    ) -> None:
        self.config = config = config or GuardConfig()
        self.manifest: dict[str, Any] | None = None  # set by load()
        self.golden: GoldenSet | None = None  # the bundle's signed golden smoke set, set by load()
        if config.anomaly.action != "off" and anomaly is None:
            raise PartsMismatch(f"anomaly.action={config.anomaly.action!r} needs an AnomalyScorer (or set action 'off')")
        gate = anomaly if config.anomaly.action != "off" else None
        if isinstance(model, (bytes, bytearray, memoryview)):
            from .admission import load_session

            data = bytes(model)
            model = lambda extend: load_session(data, admission_limits, threads, 1, extend)  # noqa: E731
        if callable(model):
            model = model(self._gate_part(gate))
        elif gate is not None:
            raise PartsMismatch("a gated guard runs its gate inside the model's own onnxruntime session, "
                                "so it loads the model itself: pass the model bytes, not a session")
        self.session = model
        inputs = model.get_inputs()
        _one_input(len(inputs))
        if not isinstance(inputs[0].shape, (list, tuple)) or len(inputs[0].shape) < 1:
            raise ModelRejected("model input must have a batch dimension", check="inputs")
        self.input_name = inputs[0].name
        model_shape = [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape[1:]]
        self.logits_name, self.features_name, n_classes = _outputs([(o.name, o.shape) for o in model.get_outputs()])
        self.num_classes = n_classes

        self.anomaly = gate
        self._run_names: list[str] = [self.logits_name]
        # The PRADA monitor may take its distances on the penultimate features instead of the inputs.
        self._monitor_features = config.extraction.enabled and config.extraction.space == "features"
        if self._monitor_features:
            if self.features_name is None:
                raise PartsMismatch("extraction.space='features' needs a 'features' output the model does not have")
            self._run_names.append(self.features_name)
        if gate is not None:
            self._run_names += GATE_OUTPUTS

        self.sanitizer = Sanitizer(config.input, model_shape)
        self.limiter = RateLimiter(config.rate_limit, storage_uri)
        self._limit = self.limiter.hit if self.limiter.enabled else None
        self.policy = OutputPolicy(config.output)
        self.monitor = ExtractionMonitor(config.extraction) if config.extraction.enabled else None
        self.telemetry = Telemetry(config.telemetry, n_classes)
        self._gate_reject = config.anomaly.action == "reject"
        self._throttle = config.extraction.enabled and config.extraction.action == "throttle"
        self.smoke_test(deadline)  # a model/detector mismatch fails here, not on the first request

    @staticmethod
    def _gate_part(gate: "AnomalyScorer | None") -> "Extension | None":
        """The admission ``Extension`` that puts ``gate`` into the model's graph (None without
        one): it reads the model's input, logits and features tensors, after checking that the
        detectors were fitted for tensors of these widths."""
        if gate is None:
            return None

        def extend(model: "onnx.ModelProto") -> bytes:
            from .anomaly import AnomalyInputError

            g = model.graph
            weights = {t.name for t in g.initializer}
            inputs = [i for i in g.input if i.name not in weights]
            _one_input(len(inputs))
            outputs = {o.name: o for o in g.output}
            logits, feats, _ = _outputs([(o.name, tensor_dims(o)) for o in g.output])
            if "features" in gate.needs and feats is None:
                raise PartsMismatch("the anomaly detectors need a 'features' output the model does not have")
            values = {"input": inputs[0], "logits": outputs[logits], "features": outputs.get(feats or "")}
            try:
                gate.check_widths({v: _sample_size(values[v]) for v in gate.needs})
            except AnomalyInputError as exc:
                raise PartsMismatch(f"the detectors do not fit this model: {exc}") from None
            return gate.extension(model, {v: values[v].name for v in gate.needs})

        return extend

    @classmethod
    def load(
        cls,
        bundle: Any,
        public_key: Any,
        kek: Any,
        rollback_state: Any = None,
        *,
        storage_uri: str = "memory://",
        now: int | None = None,
        admission_limits: "AdmissionLimits | None" = None,
        threads: int = 1,
        accept: bool = True,
        deadline: "Deadline | None" = None,
    ) -> GuardedModel:
        """Verify + decrypt a bundle in memory and build the guard from its signed parts.

        Payload ``model`` is the ONNX model, optional ``detectors.npz`` the OOD
        detector arrays; the manifest's ``runtime`` dict is the ``GuardConfig``
        (its ``anomaly.detector_meta`` is the detectors' JSON). With ``accept``
        the anti-rollback state is advanced once the guard answered a smoke
        request; every failure is a ``LoadError`` (``runtime_guard.errors``): BundleError
        subtypes, ModelRejected, GuardConfigError, AnomalyFormatError, PartsMismatch. ``deadline`` bounds the smoke run (``DeadlineExceeded``).
        """
        from .bundle import open_bundle

        opened = open_bundle(bundle, public_key, kek, rollback_state=rollback_state, now=now)
        config = GuardConfig.from_dict(opened.manifest.get("runtime", {}))
        scorer = None
        if config.anomaly.action != "off":
            from .anomaly import AnomalyScorer

            if DETECTORS_PAYLOAD not in opened.payloads or config.anomaly.detector_meta is None:
                raise PartsMismatch(
                    f"runtime.anomaly.action={config.anomaly.action!r} but the bundle lacks "
                    f"'{DETECTORS_PAYLOAD}' or runtime.anomaly.detector_meta"
                )
            scorer = AnomalyScorer.from_bytes(opened.payloads[DETECTORS_PAYLOAD], config.anomaly.detector_meta)
        from .admission import load_session_streamed

        # The plaintext is admitted and freed before onnxruntime streams the model in again.
        def stream(extend: "Extension | None") -> "ort.InferenceSession":
            return load_session_streamed(opened.take_model, opened.stream_model, admission_limits, threads, 1, extend)

        guard = cls(
            stream, config, scorer, storage_uri, admission_limits=admission_limits, threads=threads,
            deadline=deadline,
        )
        guard.manifest = opened.manifest
        guard.golden = read_golden(opened.manifest, opened.payloads)
        if accept:  # the constructor's smoke test passed
            opened.accept()
        return guard

    def smoke_test(self, deadline: "Deadline | None" = None) -> None:
        """Run one mid-range sample through model and detectors (no limits, no telemetry).

        Raises ``PartsMismatch`` if the parts do not fit (detectors fitted for another model),
        ``ModelRejected`` (check ``smoke-run``) if onnxruntime fails on the sample
        (e.g. a runtime allocation of TiBs) and ``DeadlineExceeded`` past ``deadline``.
        """
        shape = [1] + [d or 1 for d in self.sanitizer.sample_shape]
        rng = self.config.input.value_range or (0.0, 1.0)
        x = np.full(shape, (rng[0] + rng[1]) / 2, dtype=np.float32)
        feeds = {self.input_name: x}
        try:
            outs = (deadline.run(self.session, self._run_names, feeds) if deadline is not None
                    else self.session.run(self._run_names, feeds))
        except ModelRejected:
            raise
        except Exception as exc:  # onnxruntime's Fail/RuntimeException: name the op, not the trace
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ModelRejected(f"onnxruntime failed on the smoke sample: {type(exc).__name__}: {msg}",
                                check="smoke-run") from None
        if outs[0].shape != (1, self.num_classes) or not np.isfinite(outs[0]).all():
            raise PartsMismatch("smoke test failed: model output is not finite [1, C] logits")
        if self.anomaly is not None and (outs[-2].shape != (1,) or not math.isfinite(outs[-1])):
            raise PartsMismatch("the detectors do not fit this model: the gate's score of the smoke sample "
                                f"is {outs[-2].tolist()} (check {float(outs[-1])})")

    # -- hot path ---------------------------------------------------------------------------

    def predict(self, x: Any, client_id: str) -> PredictionResult:
        """Guarded inference for one request (a sample or a batch) from ``client_id``."""
        t0 = _clock()
        if type(client_id) is not str or not client_id or len(client_id) > MAX_CLIENT_ID_LEN:
            raise InvalidClientId(f"client_id must be a non-empty string of at most {MAX_CLIENT_ID_LEN} chars")
        if self._throttle:
            wait = self.monitor.throttled_for(client_id)  # type: ignore[union-attr]
            if wait > 0:
                verdict = Verdict.refused(Decision.RATE_LIMITED, Reason.EXTRACTION_THROTTLED)
                return self._finish(t0, PredictionResult(verdict, retry_after=wait))
        if self._limit is not None:
            refused = self._limit(client_id)
            if refused is not None:
                verdict = Verdict.refused(Decision.RATE_LIMITED, Reason.of(Stage.RATE_LIMIT, refused.scope))
                res = PredictionResult(verdict, retry_after=refused.reset_after, rate_limit=refused)
                return self._finish(t0, res)
        try:
            arr = self.sanitizer(x)
        except SanitizerError as e:
            return self._finish(t0, PredictionResult(Verdict.refused(Decision.REJECTED, e.verdict_reason)))

        outs = self.session.run(self._run_names, {self.input_name: arr})
        logits = outs[0]
        if not math.isfinite(logits.sum()):  # NaN/Inf propagate through the sum
            return self._finish(t0, PredictionResult(Verdict.refused(Decision.REJECTED, Reason.OUTPUT_NON_FINITE)))
        raw_labels = logits.argmax(axis=1)
        reasons: list[Reason] = []

        ood_scores = ood = None
        any_ood = False
        if self.anomaly is not None:
            ood_scores = outs[-2]
            if not math.isfinite(outs[-1]):  # a view the sanitizer does not see (features) overflowed
                from .anomaly import non_finite

                raise non_finite()
            ood = ood_scores > self.anomaly.threshold
            any_ood = bool(ood.any())
            if any_ood:
                reasons.append(Reason.OOD)

        # The monitor sees every query that reached the model, including ones the gate refuses.
        seen = outs[1] if self._monitor_features else arr
        if self.monitor is not None and self.monitor.observe(client_id, seen, raw_labels, ood):
            reasons.append(Reason.EXTRACTION)

        if any_ood and self._gate_reject:
            verdict = Verdict(Decision.REJECTED, tuple(reasons), Stage.ANOMALY)
            res = PredictionResult(verdict, None, None, ood_scores, logits=logits)
        else:
            labels, scores = self.policy.apply_labelled(logits, ood, raw_labels)
            verdict = Verdict(Decision.FLAGGED, tuple(reasons)) if reasons else ACCEPTED
            res = PredictionResult(verdict, labels, scores, ood_scores, logits=logits)
        res.latency_s = latency = _clock() - t0
        self.telemetry.record(verdict, latency, raw_labels, ood_scores)
        return res

    def _finish(self, t0: float, res: PredictionResult) -> PredictionResult:
        """Refusals before the model answered: timing and telemetry."""
        res.latency_s = _clock() - t0
        self.telemetry.record(res.verdict, res.latency_s, None, None)
        return res

    # -- introspection for the API and audits -----------------------------------------------

    def rate_limit_status(self, client_id: str) -> RateLimitStatus | None:
        """Remaining budget of the binding scope (for RateLimit-* headers); None if unlimited."""
        return self.limiter.status(client_id)

    def monitor_state(self, client_id: str) -> MonitorState | None:
        """PRADA state of one client (queries, last W, queries until flagged)."""
        return self.monitor.state(client_id) if self.monitor is not None else None

    def snapshot(self) -> dict[str, Any]:
        """Telemetry aggregates plus extraction-monitor counts."""
        snap = self.telemetry.snapshot()
        snap["extraction_monitor"] = self.monitor.snapshot() if self.monitor is not None else None
        snap["output_policy"] = self.config.output.policy
        return snap


def _sample_size(value: "onnx.ValueInfoProto | None") -> int | None:
    """Values per sample of a model tensor with a fixed sample shape (None: unknown)."""
    dims = None if value is None else tensor_dims(value)
    sample = [d for d in (dims or [])[1:] if isinstance(d, int)]
    if dims is None or len(sample) != len(dims) - 1:
        return None
    return math.prod(sample)
