"""Victims an extraction attacker can query, with exact accounting of every query.

A victim turns a batch of inputs into what the attacker sees: a ``[n, C]``
score matrix. A row the defence did not answer (rejected by the OOD gate,
rate-limited, transport error) is all zeros and the attacker drops it (see
:meth:`Victim.answered`). Each victim keeps a :class:`QueryLedger`; the
invariant ``sent == answered + rejected + rate_limited + errors`` is checked
by the tests so no query is lost or double-counted.

Victims: :class:`ModelVictim` (bare model, softmax scores),
:class:`PolicyVictim` (the runtime's output policies), :class:`GuardedVictim`
(the whole guarded runtime, in process) and :class:`HttpVictim` (a running
edgeward API over loopback HTTP).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from attacks.errors import InputError
from runtime_guard.output_policy import softmax
from runtime_guard.verdict import ANSWERED as _ANSWERED
from runtime_guard.verdict import Decision, Reason

# Ledger decisions: the guard's (runtime_guard.verdict.Decision) plus "error" (no verdict reached us).
ANSWERED = tuple(d.value for d in Decision if d in _ANSWERED)
DECISIONS = (*(d.value for d in Decision), "error")


@dataclass
class QueryLedger:
    """Per-attacker counts; ``flagged`` answers are also counted in ``answered``."""

    sent: int = 0
    answered: int = 0
    rejected: int = 0
    rate_limited: int = 0
    errors: int = 0
    flagged: int = 0
    first_flagged_at: int | None = None  # 1-based number of the first query the extraction monitor flagged

    def record(self, decision: str, extraction_flag: bool = False) -> None:
        """Count one query; ``extraction_flag`` = the runtime's extraction monitor flagged this client."""
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}")
        self.sent += 1
        if extraction_flag and self.first_flagged_at is None:
            self.first_flagged_at = self.sent
        if decision in ANSWERED:
            self.answered += 1
            if decision == "flagged":
                self.flagged += 1
        elif decision == "rejected":
            self.rejected += 1
        elif decision == "rate_limited":
            self.rate_limited += 1
        else:
            self.errors += 1

    @property
    def balanced(self) -> bool:
        return self.sent == self.answered + self.rejected + self.rate_limited + self.errors

    def to_dict(self) -> dict:
        return {**asdict(self), "balanced": self.balanced}


@dataclass
class Answer:
    """What a victim returned for a batch (one entry per row)."""

    scores: np.ndarray  # [n, C]
    decisions: list[str]
    labels: np.ndarray | None = None  # the label the victim delivered (None: argmax of scores)
    extraction_flags: list[bool] | None = None


def _row(scores: np.ndarray, label: int | None) -> np.ndarray:
    """The attacker's view of one answer: the scores, nudged so their argmax is the delivered label
    (a rounded or top-k vector can tie; the runtime sends the label explicitly)."""
    row = np.asarray(scores, np.float32).copy()
    if label is not None and (row.sum() <= 0 or int(row.argmax()) != label or (row == row.max()).sum() > 1):
        if row.sum() <= 0:
            row[label] = 1.0
        else:
            row[label] = row.max() + 1e-4
    return row


def _key(row: np.ndarray) -> bytes:
    return np.ascontiguousarray(row, dtype=np.float32).tobytes()


class Victim:
    """Base class: subclasses implement :meth:`_answer`; everything else is shared."""

    name = "victim"

    def __init__(self, nb_classes: int, sample_shape: tuple[int, ...], clip_values: tuple[float, float] = (0.0, 1.0)):
        self.nb_classes = int(nb_classes)
        self.sample_shape = tuple(sample_shape)
        self.clip_values = clip_values
        self.client_id = "attacker-0"
        self.ledger = QueryLedger()
        self._unanswered: set[bytes] = set()
        self.labels_seen: set[int] = set()

    def _answer(self, x: np.ndarray) -> Answer:
        """Scores, labels (or None) and decision per row; unanswered rows may hold anything."""
        raise NotImplementedError

    def new_attacker(self, client_id: str) -> None:
        """Start a fresh attacker (own key, own ledger); stateful victims keep their server state."""
        self.client_id = client_id
        self.ledger = QueryLedger()
        self._unanswered = set()
        self.labels_seen = set()

    def query(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1, *self.sample_shape)
        ans = self._answer(x)
        if len(ans.decisions) != len(x):
            raise RuntimeError(f"{self.name}: {len(ans.decisions)} decisions for {len(x)} queries")
        out = np.zeros((len(x), self.nb_classes), np.float32)
        for i, d in enumerate(ans.decisions):
            self.ledger.record(d, bool(ans.extraction_flags is not None and ans.extraction_flags[i]))
            if d in ANSWERED:
                out[i] = _row(ans.scores[i], None if ans.labels is None else int(ans.labels[i]))
                if out[i].sum() > 0:
                    self.labels_seen.add(int(out[i].argmax()))
            else:
                self._unanswered.add(_key(x[i]))
        return out

    def answered(self, x: np.ndarray) -> np.ndarray:
        """Mask of rows of ``x`` this attacker got an answer for (used to drop the others before training)."""
        if not self._unanswered:
            return np.ones(len(x), bool)
        return np.array([_key(r) not in self._unanswered for r in x], bool)

    def art_classifier(self):
        """The victim as an ART black box (what ART's extraction attacks query)."""
        from art.estimators.classification import BlackBoxClassifier

        return BlackBoxClassifier(
            self.query,
            input_shape=self.sample_shape,
            nb_classes=self.nb_classes,
            clip_values=self.clip_values,
        )


class ModelVictim(Victim):
    """The bare model: full softmax probabilities, every query answered."""

    name = "bare"

    def __init__(
        self,
        session,
        input_name: str,
        logits_output: str,
        nb_classes: int,
        sample_shape: tuple[int, ...],
        features_output: str | None = None,
    ):
        super().__init__(nb_classes, sample_shape)
        self.session = session
        self.input_name = input_name
        self.logits_output = logits_output
        self.features_output = features_output

    def run(self, x: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ``(logits, features)``; features are None when the model has no feature output."""
        x = np.asarray(x, np.float32)
        names = [self.logits_output] + ([self.features_output] if self.features_output else [])
        parts = [self.session.run(names, {self.input_name: x[i : i + batch]}) for i in range(0, len(x), batch)]
        logits = np.concatenate([p[0] for p in parts]).astype(np.float32)
        feats = np.concatenate([p[1] for p in parts]) if self.features_output else None
        return logits, feats

    def logits(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        x = np.asarray(x, np.float32)
        parts = [self.session.run([self.logits_output], {self.input_name: x[i : i + batch]})[0]
                 for i in range(0, len(x), batch)]
        return np.concatenate(parts).astype(np.float32)

    def labels(self, x: np.ndarray) -> np.ndarray:
        """The raw model's top-1 labels (the reference for fidelity)."""
        return self.logits(x).argmax(1)

    def _answer(self, x: np.ndarray) -> Answer:
        return Answer(softmax(self.logits(x)).astype(np.float32), ["accepted"] * len(x))


class PolicyVictim(Victim):
    """The model behind one runtime output policy (``runtime_guard.output_policy.OutputPolicy``):
    ``policy.apply(logits, ood) -> (labels, scores)``. ``gate(x) -> bool mask`` (optional) gives the OOD
    verdicts that adaptive misinformation needs."""

    def __init__(
        self,
        model: ModelVictim,
        name: str,
        policy: Any,
        gate: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        super().__init__(model.nb_classes, model.sample_shape)
        self.model = model
        self.name = name
        self.policy = policy
        self.gate = gate

    def _answer(self, x: np.ndarray) -> Answer:
        logits = self.model.logits(x)
        labels, scores = self.policy.apply(logits, None if self.gate is None else self.gate(x))
        return Answer(np.asarray(scores, np.float32), ["accepted"] * len(x), np.asarray(labels))


class GuardedVictim(Victim):
    """The guarded runtime in process: each row is one ``predict(x, client_id)`` call."""

    name = "guarded"

    def __init__(self, guarded: Any, nb_classes: int, sample_shape: tuple[int, ...]):
        super().__init__(nb_classes, sample_shape)
        self.guarded = guarded

    def _predict_one(self, row: np.ndarray) -> Any:
        """The guard's result for one (1, ...) row; None when the query was never answered
        (counted ``rate_limited``, as the runtime counts a refusal)."""
        return self.guarded.predict(row, self.client_id)

    def _answer(self, x: np.ndarray) -> Answer:
        scores = np.zeros((len(x), self.nb_classes), np.float32)
        labels = np.zeros(len(x), np.int64)
        decisions: list[str] = []
        flags: list[bool] = []
        for i in range(len(x)):
            r = self._predict_one(x[i : i + 1])
            if r is None:
                decisions.append("rate_limited")
                flags.append(False)
                continue
            d = r.verdict.decision.value
            decisions.append(d)
            flags.append(Reason.EXTRACTION in r.verdict.reasons)
            if d in ANSWERED and r.labels is not None:
                labels[i] = int(r.labels[0])
                if r.scores is not None:
                    scores[i] = np.asarray(r.scores[0], np.float32)
        return Answer(scores, decisions, labels, flags)


def _decision(d: Any) -> str:
    """A decision string from an HTTP body; anything else is an error."""
    return d if isinstance(d, str) and d in DECISIONS[:-1] else "error"


class HttpVictim(Victim):
    """A running edgeward API over loopback HTTP (``POST /v1/predict``, one sample per request).

    ``keys`` are bearer tokens; with several keys (a Sybil attacker) requests rotate over them and
    ``per_key`` keeps a ledger per key. The guard's decision is read from the body (answers and
    refusal problems carry it, see ``api.decisions``); see :func:`http_decision`.

    ``patience_s`` > 0 makes a patient attacker: a 429 is waited out (its ``Retry-After``, at
    most ``patience_s`` per query in total) and the same query resent, so the budget is spent
    under the deployed rate limit instead of lost to it. Each resend is counted in ``retries``
    and the time slept in ``waited_s``; the ledger records only the final answer per query.
    """

    name = "http"

    def __init__(
        self,
        base_url: str,
        nb_classes: int,
        sample_shape: tuple[int, ...],
        keys: list[str] | None = None,
        path: str = "/v1/predict",
        timeout: float = 10.0,
        patience_s: float = 0.0,
    ):
        super().__init__(nb_classes, sample_shape)
        if not base_url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise InputError(f"HTTP victim must be on loopback, got {base_url}")
        self.url = base_url.rstrip("/") + path
        self.keys = list(keys or [])
        self.timeout = timeout
        self.retry_after: list[float] = []
        self.per_key: dict[int, QueryLedger] = {}
        self._turn = 0
        self.patience_s = float(patience_s)
        self.retries = 0
        self.waited_s = 0.0

    def new_attacker(self, client_id: str) -> None:
        super().new_attacker(client_id)
        self.per_key = {i: QueryLedger() for i in range(max(1, len(self.keys)))}
        self.retry_after = []
        self._turn = 0
        self.retries = 0
        self.waited_s = 0.0

    def _post(self, row: np.ndarray, key: str | None) -> tuple[int, dict]:
        body = json.dumps({"inputs": row[None].tolist()}).encode()
        req = urllib.request.Request(self.url, data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        if key is not None:
            req.add_header("Authorization", "Bearer " + key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read() or b"{}")
            except ValueError:
                payload = {}
            if e.code == 429:
                ra = e.headers.get("Retry-After")
                if ra is not None:
                    try:
                        self.retry_after.append(float(ra))
                    except ValueError:
                        pass
            return e.code, payload
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError):
            return 0, {}

    def _answer(self, x: np.ndarray) -> Answer:
        scores = np.zeros((len(x), self.nb_classes), np.float32)
        labels = np.zeros(len(x), np.int64)
        decisions: list[str] = []
        flags: list[bool] = []
        for i in range(len(x)):
            k = self._turn % max(1, len(self.keys))
            self._turn += 1
            key = self.keys[k] if self.keys else None
            status, payload = self._post(x[i], key)
            waited = 0.0
            while status == 429 and waited < self.patience_s:
                pause = min(max(self.retry_after[-1] if self.retry_after else 1.0, 0.01), self.patience_s - waited)
                time.sleep(pause)
                waited += pause
                self.retries += 1
                status, payload = self._post(x[i], key)
            self.waited_s += waited
            d = http_decision(status, payload)
            flags.append("extraction" in (payload.get("reasons") or []))
            if d in ANSWERED:
                try:
                    labels[i] = int(payload["labels"][0])
                    if payload.get("scores") is not None:
                        scores[i] = np.asarray(payload["scores"][0], np.float32)
                except (KeyError, IndexError, TypeError, ValueError):
                    d = "error"  # a 200 we cannot read is not an answer
            decisions.append(d)
            self.per_key.setdefault(k, QueryLedger()).record(d, flags[-1])
        return Answer(scores, decisions, labels, flags)


def http_decision(status: int, payload: dict) -> str:
    """Map an HTTP answer to a ledger decision: 200s and the guard's refusals carry its decision
    in the body; otherwise 429 is rate-limited, 400 (a body the API refused before the guard) a
    rejection, anything else (5xx, connection error, unreadable 200) an error."""
    if status == 200:
        return _decision(payload.get("decision", "accepted"))
    if "decision" in payload:
        return _decision(payload["decision"])
    if status == 429:
        return "rate_limited"
    if status in (400, 422):
        return "rejected"
    return "error"
