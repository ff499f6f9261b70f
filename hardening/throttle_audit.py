"""Throttling as a defence, measured: the fidelity a thief loses at a fixed wall-clock budget.

The PRADA monitor only *flags* by default (``action=flag``): a flagged thief keeps its full
rate. With ``action=throttle`` and ``throttle_interval`` a flagged client's rate budget
shrinks to one query per interval (``runtime_guard.extraction_monitor``). What that buys is
not a yes/no: within the same wall-clock time the thief gets fewer answers, so its copy is
worse. Here both actions run against the same guarded runtime (real gate, real monitor, real
output policy) with the same thief, on a simulated clock so an hour of attack takes seconds:

* the thief is patient: it sends at the deployed per-client rate (queries spaced 1/rate apart)
  and waits out every throttle refusal (its ``retry_after``) before resending;
* a query it could not send before the wall-clock budget ends is lost (``timed_out``), so
  every thief spends the same nominal ``rate x seconds`` budget and only the answers differ.

The monitor runs on the same simulated clock (its public ``clock`` argument); the rate limit
is applied by the spacing rather than by ``limits`` (whose storage reads the real clock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attacks.adaptive_thieves import ADAPTIVE_ATTACKS, steal_adaptive
from attacks.extraction import steal, thief_spec_for
from attacks.thief_data import make_pool
from attacks.victims import GuardedVictim
from hardening.data import Dataset, load_dataset
from hardening.errors import InputError
from hardening.extraction_audit import (
    ADAPTIVE_POOL_FACTOR,
    ATTACKS,
    GATE_ALPHA,
    RateModel,
    _fit_gate,
    _thief_data,
    build_victims,
    default_guard_config,
)
from hardening.intake import check_fits, load_model, make_session
from runtime_guard.extraction_monitor import ExtractionMonitor
from runtime_guard.verdict import Reason

ACTIONS = ("flag", "throttle")


class WallClockVictim(GuardedVictim):
    """The in-process guarded runtime on a simulated clock, queried at ``rate_qps`` for ``seconds``."""

    def __init__(self, guarded: Any, nb_classes: int, sample_shape: tuple[int, ...], rate_qps: float,
                 seconds: float, clock: list[float]):
        super().__init__(guarded, nb_classes, sample_shape)
        self.rate_qps, self.seconds, self.clock = rate_qps, seconds, clock
        self.throttled = 0  # queries that had to wait out a throttle refusal at least once
        self.timed_out = 0  # queries the wall-clock budget did not leave time for

    def new_attacker(self, client_id: str) -> None:
        super().new_attacker(client_id)
        self.throttled = self.timed_out = 0

    def _predict_one(self, row: np.ndarray) -> Any:
        """Wait out throttle refusals on the clock; None once the budget has no time left."""
        waited = False
        while self.clock[0] < self.seconds:
            r = self.guarded.predict(row, self.client_id)
            if Reason.EXTRACTION_THROTTLED in r.verdict.reasons:
                waited = True
                self.clock[0] += float(r.retry_after or 1.0)
                continue
            self.clock[0] += 1.0 / self.rate_qps
            self.throttled += waited
            return r
        self.throttled += waited
        self.timed_out += 1
        return None


@dataclass
class ThrottleRun:
    action: str
    attack: str
    scenario: str
    nominal_queries: int  # rate x wall-clock budget
    answered: int
    rejected: int
    throttled: int
    timed_out: int
    first_flagged_at: int | None
    fidelity: float
    accuracy: float


@dataclass
class ThrottleReport:
    rate: str
    wall_seconds: float
    throttle_interval: float
    throttle_seconds: float
    monitor: dict
    runs: list[ThrottleRun]
    fidelity_loss: dict[str, float] = field(default_factory=dict)  # per attack: flag - throttle
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def run_throttle_audit(
    model_path: str | Path,
    dataset: str | Path | Dataset,
    torch_source: str | Path | None = None,
    attacks: Sequence[str] = ("jbda", "jbda+gate", "active_uncertainty+gate"),
    scenario: str = "in_dist",
    rate_limit: str = "60/minute",
    wall_seconds: float = 600.0,
    throttle_interval: float = 30.0,
    throttle_seconds: float = 3600.0,
    monitor: dict | None = None,
    train_steps: int = 100,
    gate_alpha: float = GATE_ALPHA,
    seed: int = 0,
) -> ThrottleReport:
    """Each thief against the guard with ``action=flag`` and with ``action=throttle`` (see module doc);
    ``monitor`` is a calibrated monitor section (``calibrate-monitor``), else PRADA's defaults."""
    import torch

    from hardening.prada_calibration import monitor_section

    for a in attacks:
        if a not in ATTACKS:
            raise InputError(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    qps = RateModel(rate_limit).per_client_qps
    if qps is None or wall_seconds <= 0:
        raise InputError("a per-client rate limit and a positive wall-clock budget are needed")
    nominal = int(qps * wall_seconds)
    if nominal < 1:
        raise InputError(f"{rate_limit} for {wall_seconds} s allows no query")
    info = load_model(model_path)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    check_fits(info, ds)
    torch.set_num_threads(1)
    session = make_session(model_path)
    scorer, _ = _fit_gate(str(model_path), ds, gate_alpha, seed)
    spec = thief_spec_for(ds.sample_shape, info.num_classes, torch_source, train_steps=train_steps)
    pool = make_pool(scenario, ADAPTIVE_POOL_FACTOR * nominal, ds.sample_shape, ds.value_range,
                     _thief_data(ds, [scenario])[0], seed=seed, n_actions=info.num_classes)
    bare = build_victims(["bare"], session, info, ds.sample_shape)["bare"]
    raw = bare.labels(ds.x)  # type: ignore[attr-defined]
    section = monitor_section(monitor, info.sha256) if monitor is not None else {}
    runs: list[ThrottleRun] = []
    mon_cfg = None
    for action in ACTIONS:
        cfg = default_guard_config(monitor=section)
        mon_cfg = dataclasses.replace(cfg.extraction, action=action, throttle_interval=throttle_interval,
                                      throttle_seconds=throttle_seconds)
        cfg = dataclasses.replace(cfg, extraction=mon_cfg)
        gm = build_victims(["guarded"], session, info, ds.sample_shape, scorer, cfg)["guarded"].guarded  # type: ignore[attr-defined]
        for attack in attacks:
            clock = [0.0]
            gm.monitor = ExtractionMonitor(mon_cfg, clock=lambda c=clock: c[0])  # type: ignore[misc]
            victim = WallClockVictim(gm, int(info.num_classes), ds.sample_shape, qps, wall_seconds, clock)
            victim.new_attacker(f"throttle-{action}-{attack}")
            if attack in ADAPTIVE_ATTACKS:
                stolen = steal_adaptive(victim, pool.x, attack, spec, nominal, seed=seed)
            else:
                stolen = steal(victim, pool.x[:nominal], attack, spec, pool.actions[:nominal], seed=seed)
            pred = stolen.predict_labels(ds.x)
            led = victim.ledger
            runs.append(ThrottleRun(action, attack, scenario, nominal, led.answered, led.rejected, victim.throttled,
                                    victim.timed_out, led.first_flagged_at, float((pred == raw).mean()),
                                    float((pred == ds.y).mean())))
    rep = ThrottleReport(rate_limit, wall_seconds, throttle_interval, throttle_seconds,
                         mon_cfg.to_dict() if mon_cfg else {}, runs)
    by = {(r.action, r.attack): r for r in runs}
    for a in attacks:
        rep.fidelity_loss[a] = round(by[("flag", a)].fidelity - by[("throttle", a)].fidelity, 4)
        if by[("throttle", a)].first_flagged_at is None:
            rep.notes.append(f"{a}: never flagged, so the throttle never applies")
    return rep
