"""Model-extraction attacks: thin adapters over ``art.attacks.extraction``.

* ``copycat``: ART ``CopycatCNN`` with hard labels (``use_probability=False``).
* ``knockoff_random``: ART ``KnockoffNets`` random sampling, trained on the
  victim's score vectors (``use_probability=True``; ART 1.20.1's
  ``PyTorchClassifier`` passes non-one-hot targets straight to
  ``CrossEntropyLoss``, i.e. soft-label distillation).
* ``knockoff_adaptive``: ART ``KnockoffNets`` bandit sampling over k-means
  clusters of the thief pool (ART always uses hard labels here).
* :func:`functionally_equivalent` wraps ``FunctionallyEquivalentExtraction``
  for one-hidden-layer ReLU MLP victims that expose raw logits.

Two ART pitfalls are handled here rather than hoped away: the thief is always
trained for a fixed number of *gradient steps* (ART's defaults of batch 1 / 10
epochs underfit or take minutes), and rows the victim did not answer (zeros
from :class:`attacks.victims.Victim`) are dropped before fitting, instead of
silently becoming "class 0" labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attacks.architectures import ARCHITECTURES, LogitsOnly
from attacks.errors import InputError
from attacks.victims import Victim

ATTACKS = ("copycat", "knockoff_random", "knockoff_adaptive")


@dataclass(frozen=True)
class ThiefSpec:
    """Thief architecture and training budget (steps, not epochs, so small budgets are not under-trained)."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    lr: float = 3e-3
    batch_size: int = 64
    train_steps: int = 300
    min_epochs: int = 5
    max_epochs: int = 150
    # "one_cycle": each fit warms the learning rate up to ``lr`` and anneals it to ~0 over its
    # epochs (torch OneCycleLR, stepped per epoch by ART); "constant": Adam at ``lr`` throughout
    lr_schedule: str = "one_cycle"

    def epochs_for(self, n: int) -> int:
        batches = max(1, math.ceil(n / self.batch_size))
        return int(min(self.max_epochs, max(self.min_epochs, math.ceil(self.train_steps / batches))))

    def to_dict(self) -> dict:
        return {"arch": self.arch, "kwargs": dict(self.kwargs), "lr": self.lr, "batch_size": self.batch_size,
                "train_steps": self.train_steps, "lr_schedule": self.lr_schedule}

    def scheduler(self, optimizer: torch.optim.Optimizer, epochs: int):
        """The per-epoch learning-rate schedule of one fit (None = constant)."""
        if self.lr_schedule == "constant":
            return None
        if self.lr_schedule != "one_cycle":
            raise InputError(f"unknown thief lr_schedule {self.lr_schedule!r}; choose one_cycle or constant")
        # ART steps it once per epoch; one spare step so the last epoch never overruns the cycle
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=epochs + 1)


STEM_RESOLUTION = 48  # the image thief's first block works at about this many pixels a side
LAST_MAP = 6  # ... and adds stride-2 blocks until its last feature map is at most this many px a side
MIN_BLOCKS, MAX_BLOCKS = 3, 6
POOL_GRID = 2  # the last map is averaged to 2x2, not 1x1: where a stroke is matters, not only that it exists


def stem_stride_for(sample_shape: tuple[int, ...]) -> int:
    """First-block stride of the ``image_cnn`` thief: 1 up to 95 px a side, then enough that
    the first block sees at most ~``STEM_RESOLUTION`` px (2 at 96x96, 4 at 224x224). At 3x96x96
    a stride of 2 makes a training step 6.8x cheaper on one thread (262 vs 38 ms at batch 64)
    and the thief was no less faithful (benchmarks: BENCHMARKS.md, issue 15)."""
    side = min(sample_shape[1:]) if len(sample_shape) == 3 else 0
    return max(1, side // STEM_RESOLUTION)


def image_thief_kwargs(sample_shape: tuple[int, ...], nb_classes: int) -> dict:
    """``image_cnn`` sized for a CxHxW victim: the strided stem above, then enough stride-2
    blocks that the last map is at most ``LAST_MAP`` px a side (so the receptive field spans
    the image: 3 blocks at 16 px, 4 at 32 and 96 px, 5 at 224 px), pooled to a
    ``POOL_GRID`` x ``POOL_GRID`` grid; width 16 up to 16 classes, then 32, and a feature layer
    of at least 2 units per class. Measured on MobileNetV3-small 3x96x96 at 500 queries: 0.18
    fidelity with three blocks and global pooling, 0.9+ with this (BENCHMARKS.md, issue 15)."""
    stem = stem_stride_for(sample_shape)
    side = -(-max(sample_shape[1:]) // stem)  # after the stem (padding 1: ceil division)
    blocks = 1
    while side > LAST_MAP and blocks < MAX_BLOCKS:
        side, blocks = -(-side // 2), blocks + 1
    blocks = max(MIN_BLOCKS, blocks)
    return {"in_channels": int(sample_shape[0]), "num_classes": int(nb_classes), "stem_stride": stem,
            "blocks": blocks, "grid": POOL_GRID, "width": 16 if nb_classes <= 16 else 32,
            "feature_dim": max(64, 2 * int(nb_classes))}


def thief_spec_for(
    sample_shape: tuple[int, ...],
    nb_classes: int,
    torch_source: str | Path | None = None,
    arch: str | None = None,
    **train: float | int,
) -> ThiefSpec:
    """Default thief = the victim's own family (fresh init): from the torch source's sidecar JSON if given,
    else sized for the input: ``digits_cnn`` for 1x8x8, ``image_cnn`` sized by
    :func:`image_thief_kwargs` for other CxHxW images, ``tabular_mlp`` for flat vectors.
    ``arch`` overrides with any zoo name (``image_cnn`` then still sized for the input)."""
    kwargs: dict = {}
    from_sidecar = False
    if arch is None and torch_source is not None:
        import json

        sidecar = Path(torch_source).with_suffix(".json")
        if sidecar.is_file():
            meta = json.loads(sidecar.read_text())
            arch, kwargs, from_sidecar = meta.get("arch"), dict(meta.get("kwargs", {})), True
    if arch is None:
        if len(sample_shape) == 3:
            arch = "digits_cnn" if tuple(sample_shape) == (1, 8, 8) else "image_cnn"
        elif len(sample_shape) == 1:
            arch = "tabular_mlp"
    if arch not in ARCHITECTURES:
        raise InputError(f"unknown thief architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if arch == "digits_cnn":
        if tuple(sample_shape) != (1, 8, 8):
            raise InputError(f"thief 'digits_cnn' needs 1x8x8 inputs, victim takes {sample_shape}")
        kwargs.setdefault("num_classes", nb_classes)
    elif arch == "image_cnn":
        if len(sample_shape) != 3:
            raise InputError(f"thief 'image_cnn' needs CxHxW inputs, victim takes {sample_shape}")
        if from_sidecar:  # the victim's own image_cnn: the same layers, fresh weights
            kwargs.setdefault("in_channels", sample_shape[0])
            kwargs.setdefault("num_classes", nb_classes)
        else:
            kwargs = image_thief_kwargs(sample_shape, nb_classes)
    elif arch == "tabular_mlp":
        if len(sample_shape) != 1:
            raise InputError(f"thief 'tabular_mlp' needs flat inputs, victim takes {sample_shape}")
        kwargs.setdefault("in_features", sample_shape[0])
        kwargs.setdefault("num_classes", nb_classes)
    if kwargs.get("num_classes") != nb_classes:
        raise InputError(f"thief has {kwargs.get('num_classes')} classes, victim has {nb_classes}")
    return ThiefSpec(arch=arch, kwargs=kwargs, **train)  # type: ignore[arg-type]


def _thief_class():
    from art.estimators.classification import PyTorchClassifier

    class AnsweredOnlyThief(PyTorchClassifier):
        """A PyTorchClassifier that trains only on answered queries, for a step budget."""

        def __init__(self, *args, victim: Victim, spec: ThiefSpec, **kwargs):
            super().__init__(*args, **kwargs)
            self.victim = victim
            self.spec = spec
            self.n_trained = 0
            self._adam = kwargs["optimizer"]

        def fit(self, x, y, batch_size=64, nb_epochs=10, **kwargs):  # noqa: D102 - ART signature
            keep = self.victim.answered(x) & (np.asarray(y).reshape(len(x), -1).sum(1) > 0)
            if not keep.any():
                return
            x, y = x[keep], y[keep]
            self.n_trained = max(self.n_trained, int(len(x)))
            epochs = min(nb_epochs, self.spec.epochs_for(len(x)))
            kwargs.pop("verbose", None)
            kwargs.setdefault("scheduler", self.spec.scheduler(self._adam, epochs))
            super().fit(x, y, batch_size=self.spec.batch_size, nb_epochs=epochs, verbose=False, **kwargs)

    return AnsweredOnlyThief


def _knockoff_class():
    from art.attacks.extraction import KnockoffNets

    class SafeKnockoffNets(KnockoffNets):
        """ART 1.20.1 normalises the 'all' reward by a running std that is 0 whenever one reward component is
        constant (e.g. label-only answers make 'cert' always 1): the bandit's probabilities become NaN and
        ``np.random.choice`` raises. Same reward, with a floor on the std."""

        def _reward_all(self, y_output, y_hat, n):
            reward = np.array([self._reward_cert(y_output), self._reward_div(y_output, n),
                               self._reward_loss(y_output, y_hat)], dtype=np.float64)
            self.reward_avg = self.reward_avg + (1.0 / n) * (reward - self.reward_avg)
            self.reward_var = self.reward_var + (1.0 / n) * ((reward - self.reward_avg) ** 2 - self.reward_var)
            if n > 1:
                reward = (reward - self.reward_avg) / np.sqrt(np.maximum(self.reward_var, 1e-12))
            else:
                reward = np.clip(reward, 0.0, 1.0)
            return float(np.mean(reward))

    return SafeKnockoffNets


def make_thief(spec: ThiefSpec, victim: Victim, seed: int = 0):
    """A fresh thief wrapped as an ART ``PyTorchClassifier``."""
    torch.manual_seed(seed)
    net = LogitsOnly(ARCHITECTURES[spec.arch](**spec.kwargs))
    return _thief_class()(
        model=net,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(net.parameters(), lr=spec.lr),
        input_shape=victim.sample_shape,
        nb_classes=victim.nb_classes,
        clip_values=victim.clip_values,
        victim=victim,
        spec=spec,
    )


@dataclass
class StolenModel:
    """One extraction run: the thief plus what it cost the attacker."""

    attack: str
    budget: int
    thief: object  # ART PyTorchClassifier
    queries_sent: int
    answered: int
    trained_on: int
    labels_seen: int  # distinct victim labels among answered queries (1 = the thief learned a constant)
    seconds: float

    def predict_labels(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.thief.predict(x.astype(np.float32), batch_size=512)).argmax(1)


def steal(
    victim: Victim,
    x: np.ndarray,
    attack: str,
    spec: ThiefSpec,
    actions: np.ndarray | None = None,
    seed: int = 0,
) -> StolenModel:
    """Run one ART extraction attack spending ``len(x)`` queries on ``victim`` (a fresh attacker is assumed:
    call ``victim.new_attacker`` first)."""
    from art.attacks.extraction import CopycatCNN

    KnockoffNets = _knockoff_class()  # noqa: N806 - ART class with one fix

    if attack not in ATTACKS:
        raise InputError(f"unknown extraction attack {attack!r}; choose from {', '.join(ATTACKS)}")
    budget = int(len(x))
    np.random.seed(seed)  # ART samples with the global numpy RNG
    thief = make_thief(spec, victim, seed)
    art_victim = victim.art_classifier()
    common = dict(batch_size_fit=spec.batch_size, batch_size_query=256, nb_epochs=spec.max_epochs, nb_stolen=budget)
    t0 = time.perf_counter()
    seen_before = victim.ledger.sent
    if attack == "copycat":
        CopycatCNN(art_victim, use_probability=False, **common).extract(x, thieved_classifier=thief)
    elif attack == "knockoff_random":
        KnockoffNets(art_victim, sampling_strategy="random", use_probability=True, verbose=False,
                     **common).extract(x, thieved_classifier=thief)
    else:
        if actions is None:
            raise InputError("knockoff_adaptive needs an action (cluster) id per thief input")
        actions = np.unique(np.asarray(actions)[:budget], return_inverse=True)[1].reshape(-1)  # ART wants 0..k-1
        KnockoffNets(art_victim, sampling_strategy="adaptive", reward="all", verbose=False,
                     **common).extract(x, y=actions, thieved_classifier=thief)
    return StolenModel(
        attack=attack,
        budget=budget,
        thief=thief,
        queries_sent=victim.ledger.sent - seen_before,
        answered=victim.ledger.answered,
        trained_on=thief.n_trained,
        labels_seen=len(victim.labels_seen),
        seconds=time.perf_counter() - t0,
    )


@dataclass
class FeeResult:
    """Functionally-equivalent extraction of a one-hidden-layer ReLU MLP."""

    ok: bool
    queries: int
    fidelity: float | None
    max_logit_error: float | None
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def functionally_equivalent(
    logits_fn,
    num_features: int,
    num_classes: int,
    num_neurons: int,
    x_fit: np.ndarray,
    x_test: np.ndarray,
    seed: int = 0,
    max_queries: int = 200_000,
) -> FeeResult:
    """Run ART's FunctionallyEquivalentExtraction against ``logits_fn`` (raw logits, float64 ideally);
    fidelity is top-1 agreement on ``x_test``. ART raises when it cannot find one critical point per
    hidden neuron (e.g. the victim only exposes probabilities or rounded scores): that is ``ok=False``."""
    from art.attacks.extraction import FunctionallyEquivalentExtraction
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    count = [0]

    class _Exhausted(Exception):
        pass

    def counted(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64).reshape(-1, num_features)
        count[0] += len(x)
        if count[0] > max_queries:  # ART's critical-point search can loop forever on flat regions
            raise _Exhausted(f"query budget of {max_queries} exhausted before extraction finished")
        return np.asarray(logits_fn(x), np.float64)

    bb = BlackBoxClassifierNeuralNetwork(counted, input_shape=(num_features,), nb_classes=num_classes)
    np.random.seed(seed)
    t0 = time.perf_counter()
    try:
        fee = FunctionallyEquivalentExtraction(bb, num_neurons=num_neurons)
        stolen = fee.extract(np.asarray(x_fit, np.float64))
    except (_Exhausted, AssertionError, ValueError, np.linalg.LinAlgError, FloatingPointError) as e:
        return FeeResult(False, count[0], None, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:300])
    queries = count[0]
    xt = np.asarray(x_test, np.float64)
    ref = np.asarray(logits_fn(xt), np.float64)
    got = np.asarray(stolen.predict(xt), np.float64)
    return FeeResult(
        ok=True,
        queries=queries,
        fidelity=float((ref.argmax(1) == got.argmax(1)).mean()),
        max_logit_error=float(np.abs(ref - got).max()),
        seconds=time.perf_counter() - t0,
    )
