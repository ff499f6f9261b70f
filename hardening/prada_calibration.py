"""Release-time calibration of the PRADA extraction monitor on benign client streams.

The fixed ``delta = 0.90`` flags honest clients (3-12% on the digits demo, more when
they resend queries) and no uniform-noise thief, because raw-input L2 distances between
noise points concentrate and look normal. Here, per deployment:

* distances are taken on standardised inputs (``center``/``scale`` = training mean and
  standard deviation per input value), shipped in the monitor config; or (``space=
  "features"``, for a model with a features output) on the standardised penultimate
  features, where an input far from the data maps far from the training features (the
  runtime then feeds the monitor the features it already computes);
* ``delta`` is a conformal lower quantile of the smallest Shapiro-Wilk W that benign
  calibration clients reach (random in-distribution, class-skewed and 10%-repeat
  streams), so at most ``target`` of benign clients fall below it in expectation;
* two complementary per-client signals get their own thresholds the same way: the share
  of the client's queries the anomaly gate refused (upper quantile) and the entropy of
  its top-1 labels (lower quantile). The target is split evenly over the enabled signals
  (union bound), so the monitor as a whole stays at ``target``.

Every figure is then *measured* on fresh benign streams and on thief streams (uniform
noise, mixup of 30 real seeds, JBDA-shaped seed perturbations), with the real
``runtime_guard.extraction_monitor.ExtractionMonitor``; where a signal detects nothing
the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hardening.errors import InputError
from runtime_guard.config import ExtractionMonitorConfig
from runtime_guard.extraction_monitor import ExtractionMonitor

Labeller = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # x -> (top-1 labels, gate rejected bool)
Embedder = Callable[[np.ndarray], np.ndarray]  # x -> penultimate features [N, D]
SPACES = ("standardized", "input", "features")
BENIGN = ("random", "class_skewed", "repeats_10pct")
THIEVES = ("uniform_noise", "mixup_30_seeds", "jbda_shaped_30_seeds")
SIGNALS = ("prada", "rejections", "label_entropy")


@dataclass
class PradaCalibration:
    target: float
    stream_length: int
    min_queries: int
    space: str  # "standardized", "input" or "features"
    n_calibration_clients: int
    config: dict  # the ExtractionMonitorConfig fields to ship (delta, min_queries, center, scale, ...)
    false_flag_rate: dict[str, float]  # per benign stream kind, all signals together
    false_flag_by_signal: dict[str, dict[str, float]]  # each signal on its own
    detection_rate: dict[str, float]  # per thief, all signals together
    detection_by_signal: dict[str, dict[str, float]]  # each signal on its own
    median_queries_to_flag: dict[str, float | None]
    clients_per_kind: int
    notes: list[str] = field(default_factory=list)
    model_sha256: str | None = None  # the model it was calibrated for (package checks it)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d["config"].items()}
        return d


def _benign(kind: str, pool: np.ndarray, labels: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return pool[rng.choice(len(pool), length, replace=len(pool) < length)]
    if kind == "class_skewed":  # 70% from one class, the rest from everything
        classes = np.unique(labels)
        main = np.flatnonzero(labels == rng.choice(classes))
        k = int(0.7 * length)
        idx = np.concatenate([rng.choice(main, k, replace=len(main) < k), rng.choice(len(pool), length - k)])
        return pool[rng.permutation(idx)]
    base = pool[rng.choice(len(pool), length, replace=len(pool) < length)]  # repeats_10pct
    rep = rng.choice(np.arange(1, length), int(0.1 * length), replace=False)
    for i in rep:
        base[i] = base[rng.integers(0, i)]
    return base


def _thief(kind: str, seeds_pool: np.ndarray, length: int, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    shape = seeds_pool.shape[1:]
    if kind == "uniform_noise":
        return rng.uniform(lo, hi, (length, *shape)).astype(np.float32)
    seeds = seeds_pool[rng.choice(len(seeds_pool), min(30, len(seeds_pool)), replace=False)]
    if kind == "mixup_30_seeds":
        a, b = rng.integers(0, len(seeds), length), rng.integers(0, len(seeds), length)
        lam = rng.beta(1.0, 1.0, (length,) + (1,) * len(shape)).astype(np.float32)
        return (lam * seeds[a] + (1 - lam) * seeds[b]).astype(np.float32)
    # JBDA-shaped: seeds and their augmentations x + lambda * sign(.), generation after generation
    lam = 0.1 * (hi - lo)
    out = [seeds]
    while sum(len(o) for o in out) < length:
        prev = out[-1]
        out.append(np.clip(prev + lam * rng.choice([-1.0, 1.0], prev.shape), lo, hi).astype(np.float32))
    return np.concatenate(out)[:length]


def _run_clients(cfg: ExtractionMonitorConfig, streams: list[np.ndarray], label: Labeller,
                 embed: Embedder | None = None) -> list:
    mon = ExtractionMonitor(cfg)
    states = []
    for i, s in enumerate(streams):
        lab, rej = label(s)
        v = s if embed is None else embed(s)  # what the runtime hands the monitor
        cid = f"c{i}"
        for j in range(0, len(s), 10):  # batches of 10, as a client might send them
            mon.observe(cid, v[j:j + 10], lab[j:j + 10], rej[j:j + 10])
        states.append(mon.state(cid))
        mon.reset(cid)
    return states


def _signal_extremes(streams: list[np.ndarray], label: Labeller, min_queries: int,
                     every: int) -> tuple[np.ndarray, np.ndarray]:
    """Per client, the highest gate-rejection rate and lowest label entropy at the points the
    monitor judges them (every ``every`` queries from ``min_queries`` on): what a threshold
    on either must clear for the client never to be flagged."""
    rr_max, ent_min = [], []
    for s in streams:
        lab, rej = label(s)
        q = np.arange(1, len(s) + 1)
        at = (q >= min_queries) & (q % every == 0)
        rate = np.cumsum(rej) / q
        counts = np.cumsum(np.eye(int(lab.max()) + 1)[lab], axis=0)
        p = counts / q[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
        rr_max.append(float(rate[at].max()) if at.any() else 0.0)
        ent_min.append(float(h[at].min()) if at.any() else math.inf)
    return np.array(rr_max), np.array(ent_min)


def _quantile_low(values: np.ndarray, rate: float) -> float | None:
    """Largest t such that, conformally, P(new benign value < t) <= rate; None if too few values."""
    v = np.sort(values)
    k = int(math.floor(rate * (len(v) + 1)))
    return None if k < 1 else float(v[k - 1])


def calibrate_prada(
    pool: np.ndarray,
    train: np.ndarray,
    label: Labeller,
    *,
    target: float = 0.01,
    clients_per_kind: int = 100,
    stream_length: int = 200,
    min_queries_grid: tuple[int, ...] = (50, 100),
    value_range: tuple[float, float] = (0.0, 1.0),
    space: str = "standardized",
    calibration_clients_per_kind: int | None = None,
    seed: int = 0,
    embed: Embedder | None = None,
) -> PradaCalibration:
    """Calibrate on benign streams drawn from ``pool`` (in-distribution inputs not used for
    training), measure on fresh ones and on thieves; ``label`` is the deployed model + gate,
    ``embed`` its penultimate features (needed for ``space="features"``)."""
    if not 0 < target < 0.5:
        raise InputError(f"target false-flag rate must be in (0, 0.5), got {target}")
    if space not in SPACES:
        raise InputError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    if space == "features" and embed is None:
        raise InputError("space 'features' needs the model's features output")
    if space != "features":
        embed = None
    rng = np.random.default_rng(seed)
    if space == "features":
        assert embed is not None
        flat = np.asarray(embed(train), np.float64).reshape(len(train), -1)
        sd = flat.std(0)
        floor = 0.05 * float(sd.mean()) + 1e-6  # dead (constant) features must not divide by ~0
    else:
        flat = train.reshape(len(train), -1).astype(np.float64)
        sd = flat.std(0)
        floor = 0.05 * (value_range[1] - value_range[0])
    standardise = space in ("standardized", "features")
    center = tuple(float(c) for c in flat.mean(0)) if standardise else None
    scale = tuple(float(s) for s in np.maximum(sd, floor)) if standardise else None
    mon_space = "features" if space == "features" else "input"
    pool_labels = label(pool)[0]
    n_signals = len(SIGNALS)
    per = target / n_signals
    if space == "input":
        notes_space = ["distances on raw inputs (noise distances concentrate there and look normal)"]
    else:
        notes_space = []
    n_cal = calibration_clients_per_kind or 3 * clients_per_kind
    cal = {k: [_benign(k, pool, pool_labels, stream_length, rng) for _ in range(n_cal)] for k in BENIGN}
    notes: list[str] = list(notes_space)
    best = None
    for mq in min_queries_grid:  # the smallest minimum query count whose thresholds are calibratable
        if mq > stream_length:
            continue
        probe = ExtractionMonitorConfig(delta=1e-12, min_queries=mq, max_distances=max(mq, stream_length),
                                        center=center, scale=scale, space=mon_space)
        # per stream kind, then the most conservative: the rate holds for each kind, not only on their mix
        deltas, rrs, ents = [], [], []
        for k in BENIGN:
            st = _run_clients(probe, cal[k], label, embed)
            w = np.array([s.min_w if s.min_w is not None else 1.0 for s in st])
            d = _quantile_low(w, per)
            if d is None:
                raise InputError(f"{len(w)} calibration clients per stream kind are too few for a {target:g} "
                                 f"false-flag target split over {n_signals} signals (need {math.ceil(1 / per)})")
            rr, ent = _signal_extremes(cal[k], label, mq, probe.test_every)
            deltas.append(d)
            rrs.append(-(_quantile_low(-rr, per) or -1.0))  # upper quantile
            ents.append(_quantile_low(ent, per) or 0.0)
        best = (mq, max(min(deltas), 1e-9), min(1.0, max(rrs)), min(ents))
        break
    if best is None:
        raise InputError(f"stream length {stream_length} is below every minimum query count {min_queries_grid}")
    mq, delta, max_rr, min_ent = best
    cfg = ExtractionMonitorConfig(delta=delta, min_queries=mq, max_distances=max(mq, stream_length), center=center,
                                  scale=scale, space=mon_space, max_rejection_rate=max_rr if max_rr < 1.0 else None,
                                  min_label_entropy=min_ent if min_ent and min_ent > 0 else None)

    prada_only = ExtractionMonitorConfig(**{**cfg.to_dict(), "max_rejection_rate": None, "min_label_entropy": None})

    def measure(streams: list[np.ndarray]) -> tuple[float, dict[str, float], float | None]:
        """All signals together, and each signal on its own (flags are sticky, so the first
        signal to fire would otherwise hide the others)."""
        st = _run_clients(cfg, streams, label, embed)
        alone = _run_clients(prada_only, streams, label, embed)
        rr, ent = _signal_extremes(streams, label, mq, cfg.test_every)
        by = {"prada": float(np.mean([s.flagged for s in alone])),
              "rejections": float(np.mean(rr > cfg.max_rejection_rate)) if cfg.max_rejection_rate is not None else 0.0,
              "label_entropy": float(np.mean(ent < cfg.min_label_entropy)) if cfg.min_label_entropy is not None else 0.0}
        after = [s.flagged_after for s in st if s.flagged]
        return float(np.mean([s.flagged for s in st])), by, (float(np.median(after)) if after else None)

    ffr, ffr_by, det, det_by, med = {}, {}, {}, {}, {}
    lo, hi = value_range
    for k in BENIGN:
        ffr[k], ffr_by[k], _ = measure([_benign(k, pool, pool_labels, stream_length, rng) for _ in range(clients_per_kind)])
    for k in THIEVES:
        det[k], det_by[k], med[k] = measure([_thief(k, pool, stream_length, lo, hi, rng) for _ in range(clients_per_kind)])
        if det[k] == 0:
            notes.append(f"{k}: detected by no signal within {stream_length} queries")
        for sig in SIGNALS:
            if det_by[k][sig] == 0:
                notes.append(f"{k}: the {sig} signal detects nothing")
    return PradaCalibration(
        target=target, stream_length=stream_length, min_queries=mq, space=space,
        n_calibration_clients=n_cal * len(BENIGN), config=cfg.to_dict(), false_flag_rate=ffr,
        false_flag_by_signal=ffr_by, detection_rate=det, detection_by_signal=det_by,
        median_queries_to_flag=med, clients_per_kind=clients_per_kind, notes=notes,
    )


# -- a deployed model's calibration (``edgeward calibrate-monitor``, ``edgeward package``) -------------


def model_labeller(session: Any, info: Any, scorer: Any = None) -> Labeller:
    """Top-1 labels of the deployed model and, with the shipped gate's ``scorer``, which inputs
    it refuses (the same scorer the runtime loads)."""
    names = [info.logits_output]
    if scorer is not None and "features" in scorer.needs:
        if info.features_output is None:
            raise InputError("the OOD detectors need a 'features' output the model does not have")
        names.append(info.features_output)

    def label(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        labs, rej = [], []
        for i in range(0, len(x), 256):
            outs = session.run(names, {info.input_name: x[i:i + 256]})
            labs.append(outs[0].argmax(1))
            if scorer is None:
                rej.append(np.zeros(len(outs[0]), dtype=bool))
            else:
                feats = outs[1] if len(outs) > 1 else None
                rej.append(scorer.is_anomalous(scorer.score(x[i:i + 256], outs[0], feats)))
        return np.concatenate(labs), np.concatenate(rej)

    return label


def model_embedder(session: Any, info: Any) -> Embedder:
    """The deployed model's penultimate features (its ``features`` output), for ``space="features"``."""
    if info.features_output is None:
        raise InputError("PRADA on features needs a model with a 'features' output (edgeward fit-ood adds one)")

    def embed(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        parts = [session.run([info.features_output], {info.input_name: x[i:i + 256]})[0] for i in range(0, len(x), 256)]
        return np.concatenate(parts).reshape(len(x), -1).astype(np.float32)

    return embed


def calibrate_model_monitor(session: Any, info: Any, ds: Any, scorer: Any = None, **kw: Any) -> PradaCalibration:
    """Calibrate the monitor for one model + gate on a dataset: benign streams from its held-out
    inputs (calibration split and test split), standardisation from its training split. Without
    a gate the rejection signal is switched off (the runtime is then never told of rejections)."""
    pool = np.concatenate([a for a in (ds.x_cal, ds.x) if a is not None]).astype(np.float32)
    train = ds.x_train if ds.x_train is not None else pool
    kw.setdefault("value_range", ds.value_range)
    if kw.get("space") == "features":
        kw["embed"] = model_embedder(session, info)
    r = calibrate_prada(pool, train, model_labeller(session, info, scorer), **kw)
    if scorer is None:
        r.config["max_rejection_rate"] = None
        r.notes.append("no OOD gate given: the gate-rejection signal is off")
    r.model_sha256 = info.sha256
    return r


def compare_spaces(session: Any, info: Any, ds: Any, scorer: Any = None,
                   spaces: tuple[str, ...] = ("standardized", "features"), **kw: Any) -> dict[str, PradaCalibration]:
    """The same calibration (target, streams, seed) in each distance space, so false flags and the
    per-thief detection rates can be read side by side; a space the model cannot offer
    (no features output) is left out with an InputError only if it is the only one asked for."""
    out: dict[str, PradaCalibration] = {}
    for sp in spaces:
        if sp == "features" and info.features_output is None and len(spaces) > 1:
            continue
        out[sp] = calibrate_model_monitor(session, info, ds, scorer, space=sp, **kw)
    return out


def monitor_section(doc: Any, model_sha256: str | None = None) -> dict:
    """The ``extraction`` section to ship, from ``calibrate-monitor --json`` output (its ``config``)
    or a bare ExtractionMonitorConfig object; refused if calibrated for another model."""
    from runtime_guard.config import GuardConfigError

    if not isinstance(doc, dict):
        raise InputError("monitor config must be a JSON object")
    got = doc.get("model_sha256")
    if model_sha256 is not None and got is not None and got != model_sha256:
        raise InputError(f"monitor config was calibrated for another model (sha256 {str(got)[:12]}...)")
    section = doc.get("config", doc) if "config" in doc else doc
    try:
        return ExtractionMonitorConfig.from_dict(section, "extraction").to_dict()
    except GuardConfigError as e:
        raise InputError(str(e)) from None
