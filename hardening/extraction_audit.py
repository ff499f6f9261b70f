"""``edgeward audit extraction``: how many queries, and how long, to steal the model.

For every thief-data scenario x victim (bare model, each runtime output policy,
the guarded runtime as a whole) x attack x query budget we run one ART
extraction attack with a fresh attacker key and measure the stolen model's
*fidelity* (top-1 agreement with the victim's raw labels on the test split)
and accuracy. From the curves: queries to reach 90% / 95% fidelity (smallest
budget on the grid) and the wall-clock time to steal under the configured rate
limit, per key and for N Sybil keys against the global limit. For honest users
(the test split) we measure each defence's accuracy cost, top-1 changes and
rejection rate, and ART's own postprocessors for comparison.

Rate limits are *computed*, not waited out: in-process victims run with the
limiter off so the fidelity curve measures the other defences; the HTTP run
(:func:`run_http_extraction`) counts real 429s.

Self-check: against the bare model with in-distribution thief data the largest
budget must reach ``SELF_CHECK_FIDELITY``; otherwise the harness is broken and
the report says so (``self_check.passed`` is False, the CLI exits 1).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attacks.adaptive_thieves import ADAPTIVE_ATTACKS, steal_adaptive
from attacks.extraction import ATTACKS as ART_ATTACKS
from attacks.extraction import steal, thief_spec_for
from attacks.thief_data import DEFAULT_SCENARIOS, SCENARIOS, SEED_MIXUP, ThiefPool, make_pool
from attacks.victims import GuardedVictim, ModelVictim, PolicyVictim, Victim
from hardening.data import Dataset, load_dataset, save_dataset
from hardening.errors import InputError
from hardening.intake import check_fits, load_model, make_session
from runtime_guard.output_policy import OUTPUT_POLICIES, softmax

DEFAULT_BUDGETS = (50, 200, 1000, 5000)
QUICK_BUDGETS = (50, 200, 500)
# "gate": the guarded runtime with the OOD gate rejecting and no extraction monitor;
# "guarded": the same plus the PRADA monitor (gate + PRADA).
VICTIMS = ("bare", *OUTPUT_POLICIES, "gate", "guarded")
DEFAULT_ATTACKS = ("copycat", "knockoff_random")
ATTACKS = (*ART_ATTACKS, *ADAPTIVE_ATTACKS)  # adaptive ones choose their queries in rounds (not default)
ADAPTIVE_POOL_FACTOR = 4  # unlabelled pool of an adaptive thief = 4x the largest budget
SELF_CHECK_FIDELITY = 0.85
DEGRADE_MARGIN = 0.10
GATE_ALPHA = 0.05
NEEDS_GATE = ("adaptive_misinformation", "gate", "guarded")

Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- rates


@dataclass(frozen=True)
class RateModel:
    """Allowed query rates; ``None`` = unlimited."""

    per_client: str | None
    global_limit: str | None = None
    sybil_keys: int = 1

    @staticmethod
    def _qps(rate: str | None) -> float | None:
        if rate is None:
            return None
        from limits import parse_many

        try:
            items = parse_many(rate)
        except ValueError:
            raise InputError(f"cannot parse rate limit {rate!r} (expected e.g. '60/minute')") from None
        if len(items) != 1:
            raise InputError(f"rate limit {rate!r}: give exactly one rate")
        return items[0].amount / items[0].get_expiry()

    @property
    def per_client_qps(self) -> float | None:
        return self._qps(self.per_client)

    @property
    def global_qps(self) -> float | None:
        return self._qps(self.global_limit)

    def seconds(self, queries: int | None, keys: int = 1) -> float | None:
        """Time for ``queries`` spread over ``keys`` keys; ``None`` if not reachable, 0 if unlimited."""
        if queries is None:
            return None
        rate = min((self.per_client_qps or math.inf) * keys, self.global_qps or math.inf)
        return 0.0 if math.isinf(rate) else queries / rate

    def to_dict(self) -> dict:
        return {"per_client": self.per_client, "global_limit": self.global_limit, "sybil_keys": self.sybil_keys,
                "per_client_qps": self.per_client_qps, "global_qps": self.global_qps}


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    scenario: str
    victim: str
    attack: str
    budget: int
    queries_sent: int
    answered: int
    rejected: int
    rate_limited: int
    flagged: int
    first_flagged_at: int | None
    trained_on: int
    labels_seen: int
    fidelity: float
    accuracy: float
    seconds: float
    reused_from: str | None = None  # same training data as this victim's run: its thief was reused


@dataclass
class Curve:
    """One fidelity-vs-budget curve and what it costs the attacker."""

    scenario: str
    victim: str
    attack: str
    budgets: list[int]
    fidelity: list[float]
    queries_to_90: int | None
    queries_to_95: int | None
    hours_to_90_one_key: float | None
    hours_to_90_sybil: float | None
    first_flagged_at: int | None  # PRADA: earliest flag over this curve's runs (None = never flagged)


@dataclass
class Verdict:
    """Which defence stops which thief: a victim's curve against the bare model's, same scenario and attack."""

    scenario: str
    attack: str
    victim: str
    fidelity_at_max: float
    bare_fidelity_at_max: float
    queries_to_90: int | None
    bare_queries_to_90: int | None
    effect: str  # "stops": bare reaches 90% on the grid, this never does; "degrades": fidelity at the largest
    # budget is >= DEGRADE_MARGIN lower; "slows": reaches 90% at a larger budget; "none"


def verdicts(curves: Sequence["Curve"]) -> list[Verdict]:
    out = []
    bare = {(c.scenario, c.attack): c for c in curves if c.victim == "bare"}
    for c in curves:
        ref = bare.get((c.scenario, c.attack))
        if c.victim == "bare" or ref is None:
            continue
        drop = ref.fidelity[-1] - c.fidelity[-1]
        if ref.queries_to_90 is not None and c.queries_to_90 is None:
            effect = "stops"
        elif drop >= DEGRADE_MARGIN:
            effect = "degrades"
        elif ref.queries_to_90 is not None and c.queries_to_90 > ref.queries_to_90:  # type: ignore[operator]
            effect = "slows"
        else:
            effect = "none"
        out.append(Verdict(c.scenario, c.attack, c.victim, c.fidelity[-1], ref.fidelity[-1], c.queries_to_90,
                           ref.queries_to_90, effect))
    return out


@dataclass
class BenignCost:
    """What a defence costs honest users on the test split."""

    victim: str
    accuracy: float  # answered and correct / all
    top1_changed: float  # answered rows whose label differs from the raw model's
    rejection_rate: float  # not answered / all
    flagged_rate: float


@dataclass
class PostprocessorShare:
    """Share of honest test inputs whose top-1 an output transform changes or blanks (ties count)."""

    source: str  # "art", "runtime" (delivered label) or "runtime-scores" (argmax of the delivered scores)
    name: str
    params: dict
    top1_changed: float  # on the test split
    top1_changed_ood: float | None = None  # on the data file's first ood_<family> (less confident inputs)


@dataclass
class SelfCheck:
    passed: bool | None  # None: not run (no 'bare' victim or no 'in_dist' scenario in this audit)
    fidelity: float | None
    threshold: float
    budget: int | None
    attack: str | None
    message: str


def _thief_data(ds: Dataset, scenarios) -> tuple[np.ndarray | None, str | None]:
    """In-distribution data the thief holds: ``x_thief``, else the training split (the
    strongest plausible thief: data from the distribution the model was trained on)."""
    if "in_dist" not in scenarios and SEED_MIXUP not in scenarios:
        return None, None
    if ds.x_thief is not None:
        return ds.x_thief, "x_thief"
    if ds.x_train is not None:
        return ds.x_train, "x_train (the data has no x_thief)"
    raise InputError(f"{ds.source}: scenario 'in_dist' needs an 'x_thief' or 'x_train' array (or drop it via --scenarios)")


@dataclass
class ExtractionReport:
    model: str
    model_sha256: str
    dataset: str
    budgets: list[int]
    scenarios: list[str]
    victims: list[str]
    attacks: list[str]
    thief: dict
    pools: list[dict]
    rate: dict
    gate: dict | None
    runs: list[RunResult]
    curves: list[Curve]
    verdicts: list[Verdict]
    benign: list[BenignCost]
    postprocessors: list[PostprocessorShare]
    self_check: SelfCheck
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    monitor: dict | None = None  # the guarded victim's extraction monitor (delta, thresholds; calibrated or not)

    def to_dict(self) -> dict:
        return asdict(self)

    def curve(self, scenario: str, victim: str, attack: str) -> Curve:
        for c in self.curves:
            if (c.scenario, c.victim, c.attack) == (scenario, victim, attack):
                return c
        raise KeyError((scenario, victim, attack))


# ----------------------------------------------------------------------------- victims


def _fit_gate(model_path: str, ds: Dataset, alpha: float, seed: int) -> tuple[Any, dict]:
    """The OOD gate the runtime would ship: the ood helper's public fit, loaded with the runtime scorer."""
    from hardening.ood import fit_ood
    from runtime_guard.anomaly import AnomalyScorer

    with tempfile.TemporaryDirectory(prefix="edgeward-extr-") as tmp:
        data_path = Path(tmp) / "data.npz"
        save_dataset(data_path, ds)
        rep = fit_ood(model_path, data_path, Path(tmp) / "gate", alpha=alpha, seed=seed)
        scorer = AnomalyScorer.load(Path(tmp) / "gate")
    return scorer, {"alpha": alpha, "threshold": rep.threshold, "heldout_frr": rep.heldout_frr,
                    "fused": list(rep.fused)}


def _gate_fn(bare: ModelVictim, scorer: Any) -> Callable[[np.ndarray], np.ndarray]:
    def gate(x: np.ndarray) -> np.ndarray:
        logits, feats = bare.run(x)
        return scorer.is_anomalous(scorer.score(x, logits, feats))

    return gate


def default_guard_config(policy: str = "full", monitor: dict | None = None) -> Any:
    """The guarded-runtime victim: OOD gate rejecting, chosen output policy, PRADA monitor flagging
    (with ``monitor``, the calibrated monitor section that ships, e.g. from ``calibrate-monitor``)."""
    from runtime_guard.config import (
        AnomalyGateConfig,
        ExtractionMonitorConfig,
        GuardConfig,
        OutputPolicyConfig,
        RateLimitConfig,
    )

    return GuardConfig(
        rate_limit=RateLimitConfig(per_client=None),
        anomaly=AnomalyGateConfig(action="reject"),
        output=OutputPolicyConfig(policy=policy),
        extraction=ExtractionMonitorConfig.from_dict({**(monitor or {}), "enabled": True, "action": "flag"},
                                                     "extraction"),
    )


def build_victims(
    names: Sequence[str],
    session: Any,
    info: Any,
    sample_shape: tuple[int, ...],
    scorer: Any = None,
    guard: Any = None,
) -> dict[str, Victim]:
    """Victim objects by name; the guarded one runs with its rate limiter off (rates are computed)."""
    from runtime_guard.config import OutputPolicyConfig
    from runtime_guard.output_policy import OutputPolicy

    bare = ModelVictim(session, info.input_name, info.logits_output, info.num_classes, sample_shape,
                       features_output=info.features_output)
    out: dict[str, Victim] = {}
    for name in names:
        if name == "bare":
            out[name] = bare
        elif name in OUTPUT_POLICIES:
            policy = OutputPolicy(OutputPolicyConfig(policy=name))
            gate = _gate_fn(bare, scorer) if name == "adaptive_misinformation" else None
            out[name] = PolicyVictim(bare, name, policy, gate)
        elif name in ("gate", "guarded"):
            from runtime_guard.config import RateLimitConfig
            from runtime_guard.guard import GuardedModel

            cfg = guard or default_guard_config()
            cfg = dataclasses.replace(cfg, rate_limit=RateLimitConfig(per_client=None, global_limit=None))
            if name == "gate":
                cfg = dataclasses.replace(cfg, extraction=dataclasses.replace(cfg.extraction, enabled=False))
            # the model's bytes, not the session: a gated guard runs its gate inside its own session
            gm = GuardedModel(Path(info.path).read_bytes(), cfg, anomaly=scorer if cfg.anomaly.action != "off" else None)
            out[name] = GuardedVictim(gm, info.num_classes, sample_shape)
            out[name].name = name
        else:
            raise InputError(f"unknown victim {name!r}; choose from {', '.join(VICTIMS)}")
    return out


# ----------------------------------------------------------------------------- metrics


def _training_key(victim: Victim, x: np.ndarray, attack: str, scenario: str, budget: int) -> tuple | None:
    """For stateless victims, a digest of exactly what the thief would train on (the answers, reduced to
    hard labels for label-only thieves). Equal digests give the same thief, so its training is reused;
    the probe queries count in the ledger just like the attack's own (they are the same queries)."""
    import hashlib

    if not isinstance(victim, (ModelVictim, PolicyVictim)) or attack not in ("copycat", "knockoff_random"):
        return None
    out = victim.query(x)
    if attack == "copycat":
        out = np.where(out.sum(1, keepdims=True) > 0, np.eye(out.shape[1], dtype=np.float32)[out.argmax(1)], 0)
    return (scenario, attack, budget, hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest())


def queries_to(budgets: Sequence[int], fidelity: Sequence[float], target: float) -> int | None:
    """Smallest budget on the grid whose fidelity reaches ``target`` (no interpolation)."""
    for b, f in sorted(zip(budgets, fidelity)):
        if f >= target:
            return int(b)
    return None


def benign_cost(victim: Victim, x: np.ndarray, y: np.ndarray, raw: np.ndarray) -> BenignCost:
    victim.new_attacker("honest-user")
    scores = victim.query(x)
    answered = scores.sum(1) > 0
    labels = scores.argmax(1)
    n = len(x)
    return BenignCost(
        victim=victim.name,
        accuracy=float((answered & (labels == y)).sum() / n),
        top1_changed=float((answered & (labels != raw)).sum() / max(1, answered.sum())),
        rejection_rate=float((~answered).sum() / n),
        flagged_rate=float(victim.ledger.flagged / n),
    )


def _changed(post: np.ndarray, raw: np.ndarray) -> float:
    top = post.max(axis=1, keepdims=True)
    tied = (post == top).sum(1) > 1
    return float(((post.argmax(1) != raw) | tied).mean())


def postprocessor_shares(logits: np.ndarray, seed: int = 0) -> list[PostprocessorShare]:
    """ART 1.20.1's postprocessors (defaults, applied to softmax probabilities as a batch) vs the runtime's
    policies: share of honest inputs whose top-1 is changed or made ambiguous."""
    from art.defences.postprocessor import ClassLabels, GaussianNoise, HighConfidence, ReverseSigmoid, Rounded

    from runtime_guard.config import OutputPolicyConfig
    from runtime_guard.output_policy import OutputPolicy

    probs = softmax(logits)
    raw = logits.argmax(1)
    out: list[PostprocessorShare] = []
    np.random.seed(seed)
    for pp, params in ((ClassLabels(), {}), (ReverseSigmoid(), {"beta": 1.0, "gamma": 0.1}),
                       (GaussianNoise(), {"scale": 0.2}), (Rounded(), {"decimals": 3}),
                       (Rounded(decimals=1), {"decimals": 1}), (HighConfidence(), {"cutoff": 0.25})):
        out.append(PostprocessorShare("art", type(pp).__name__, params, _changed(pp(probs.copy()), raw)))
    for name in (p for p in OUTPUT_POLICIES if p != "adaptive_misinformation"):  # it needs the gate
        cfg = OutputPolicyConfig(policy=name)
        labels, scores = OutputPolicy(cfg).apply(logits)
        # the runtime returns the label separately; its scores' argmax is what a score-only reader sees
        params = {k: v for k, v in cfg.to_dict().items() if k != "policy"}
        out.append(PostprocessorShare("runtime", name, params, float((labels != raw).mean())))
        out.append(PostprocessorShare("runtime-scores", name, params, _changed(np.asarray(scores), raw)))
    return out


# ----------------------------------------------------------------------------- plots


def plot_curves(report: ExtractionReport, out_dir: str | Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    styles = {"copycat": "-", "knockoff_random": "--", "knockoff_adaptive": ":"}
    for sc in report.scenarios:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in report.curves:
            if c.scenario != sc:
                continue
            ax.plot(c.budgets, c.fidelity, styles.get(c.attack, "-"), marker="o", label=f"{c.victim} / {c.attack}")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.axhline(0.9, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("queries (budget)")
        ax.set_ylabel("fidelity (agreement with victim)")
        ax.set_title(f"extraction fidelity vs queries: {sc}")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out / f"extraction_{sc}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


# ----------------------------------------------------------------------------- orchestration


def _check_names(kind: str, got: Sequence[str], known: Sequence[str]) -> list[str]:
    got = list(dict.fromkeys(got))
    bad = [g for g in got if g not in known]
    if bad or not got:
        raise InputError(f"unknown {kind} {bad or '(none)'}; choose from {', '.join(known)}")
    return got


def build_context(model_path, dataset, torch_source, scenarios, victims_wanted, budgets, guard, thief_arch,
                  train_steps, gate_alpha, seed, monitor: dict | None = None) -> tuple[CellContext, dict]:
    """Victims (with the fitted OOD gate where needed), thief pools and the raw test labels.
    Seeded: a worker that builds it from the same files gets the same context."""
    info = load_model(model_path)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    check_fits(info, ds)
    if info.num_classes is None:
        raise InputError(f"{model_path}: logits need a fixed number of classes")
    thief_x, thief_from = _thief_data(ds, scenarios)
    import torch

    torch.set_num_threads(1)
    session = make_session(model_path)
    spec = thief_spec_for(ds.sample_shape, info.num_classes, torch_source, thief_arch, train_steps=train_steps)

    scorer, gate_info = None, None
    if any(v in NEEDS_GATE for v in victims_wanted):
        if ds.x_train is None or ds.x_cal is None:
            raise InputError(f"{ds.source}: the OOD gate needs 'x_train' and 'x_cal' (drop adaptive_misinformation/guarded)")
        scorer, gate_info = _fit_gate(str(model_path), ds, gate_alpha, seed)
    if guard is None and monitor is not None:
        from hardening.prada_calibration import monitor_section

        guard = default_guard_config(monitor=monitor_section(monitor, info.sha256))
    victims = build_victims(victims_wanted, session, info, ds.sample_shape, scorer, guard)
    bare = victims.get("bare") or build_victims(["bare"], session, info, ds.sample_shape)["bare"]
    raw_test = bare.labels(ds.x)  # type: ignore[attr-defined]

    lo, hi = ds.value_range
    pools: dict[str, ThiefPool] = {
        sc: make_pool(sc, budgets[-1], ds.sample_shape, (lo, hi), thief_x, seed=seed, n_actions=info.num_classes)
        for sc in scenarios
    }

    return CellContext(victims, pools, spec, ds, raw_test, seed, thief_x, int(info.num_classes), budgets[-1]), {
        "info": info, "bare": bare, "thief_from": thief_from, "gate_info": gate_info, "guard": guard}


def run_extraction_audit(
    model_path: str | Path,
    dataset: str | Path | Dataset,
    torch_source: str | Path | None = None,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    scenarios: Sequence[str] = DEFAULT_SCENARIOS,
    policies: Sequence[str] = VICTIMS,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    rate_limit: str | None = "60/minute",
    global_limit: str | None = None,
    sybil_keys: int = 10,
    guard: Any = None,
    monitor: dict | None = None,
    thief_arch: str | None = None,
    train_steps: int = 300,
    gate_alpha: float = GATE_ALPHA,
    seed: int = 0,
    plot_dir: str | Path | None = None,
    progress: Progress | None = None,
    executor: Any = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> ExtractionReport:
    """Run the extraction grid (see module doc); ``policies`` are victim names from ``VICTIMS``.

    ``executor`` / ``checkpoint_dir`` / ``resume``: run the grid as shards, one per scenario x
    attack x budget (``hardening.extraction_shards``); the result is the same."""

    t_start = time.perf_counter()
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] <= 0:
        raise InputError(f"budgets must be positive integers, got {budgets}")
    scenarios = _check_names("scenario", scenarios, SCENARIOS)
    victims_wanted = _check_names("victim/policy", policies, VICTIMS)
    attacks = _check_names("attack", attacks, ATTACKS)
    if sybil_keys < 1:
        raise InputError(f"--sybil-keys must be at least 1, got {sybil_keys}")
    rate = RateModel(rate_limit, global_limit, sybil_keys)
    _ = (rate.per_client_qps, rate.global_qps)  # parse now: a bad rate is an input error before any work

    ctx, setup = build_context(model_path, dataset, torch_source, scenarios, victims_wanted, budgets, guard,
                               thief_arch, train_steps, gate_alpha, seed, monitor)
    guard = setup["guard"]
    info, ds, victims, pools, spec, raw_test = setup["info"], ctx.ds, ctx.victims, ctx.pools, ctx.spec, ctx.raw_test
    bare, thief_from, gate_info = setup["bare"], setup["thief_from"], setup["gate_info"]
    total = len(scenarios) * len(victims) * len(attacks) * len(budgets)
    if executor is None and checkpoint_dir is None:
        runs = []
        done = 0
        for sc in scenarios:
            for attack in attacks:
                for b in budgets:
                    runs += _run_cell(ctx, sc, attack, b, progress, done, total)
                    done += len(victims)
        runs = _grid_order(runs, scenarios, list(victims), attacks, budgets)
    else:
        from hardening.extraction_shards import run_cells

        runs = run_cells(ctx, executor, checkpoint_dir, resume, progress, model_path=str(model_path),
                         dataset=dataset, torch_source=torch_source, scenarios=scenarios, attacks=attacks,
                         budgets=budgets, victims=list(victims), thief_arch=thief_arch, train_steps=train_steps,
                         gate_alpha=gate_alpha, guard=guard)
        done = total
    if progress:
        progress(done, total, "honest-user costs")

    curves = []
    for sc in scenarios:
        for vname in victims:
            for attack in attacks:
                rs = [r for r in runs if (r.scenario, r.victim, r.attack) == (sc, vname, attack)]
                bs, fs = [r.budget for r in rs], [r.fidelity for r in rs]
                q90 = queries_to(bs, fs, 0.90)
                t1, tn = rate.seconds(q90, 1), rate.seconds(q90, sybil_keys)
                flags = [r.first_flagged_at for r in rs if r.first_flagged_at is not None]
                curves.append(Curve(sc, vname, attack, bs, fs, q90, queries_to(bs, fs, 0.95),
                                    None if t1 is None else t1 / 3600, None if tn is None else tn / 3600,
                                    min(flags) if flags else None))

    benign = [benign_cost(v, ds.x, ds.y, raw_test) for v in victims.values()]
    shares = postprocessor_shares(bare.logits(ds.x), seed)  # type: ignore[attr-defined]
    if ds.ood:
        ood_x = next(iter(ds.ood.values()))
        for sh, o in zip(shares, postprocessor_shares(bare.logits(ood_x), seed)):  # type: ignore[attr-defined]
            sh.top1_changed_ood = o.top1_changed

    report = ExtractionReport(
        model=str(model_path), model_sha256=info.sha256, dataset=ds.source, budgets=budgets,
        scenarios=scenarios, victims=list(victims), attacks=attacks, thief={**spec.to_dict(), "in_dist_data": thief_from},
        pools=[p.to_dict() for p in pools.values()], rate=rate.to_dict(), gate=gate_info, runs=runs,
        curves=curves, verdicts=verdicts(curves), benign=benign, postprocessors=shares, self_check=self_check(runs, budgets),
    )
    if "guarded" in victims:
        mon = (guard or default_guard_config()).extraction
        report.monitor = {"calibrated": mon.center is not None, "delta": mon.delta, "min_queries": mon.min_queries,
                          "max_rejection_rate": mon.max_rejection_rate, "min_label_entropy": mon.min_label_entropy}
    if plot_dir is not None:
        report.plots = plot_curves(report, plot_dir)
    report.seconds = round(time.perf_counter() - t_start, 2)
    return report


@dataclass
class CellContext:
    """What every grid cell's runs need: the victims, the thief pools and the test split."""

    victims: dict[str, Victim]
    pools: dict[str, ThiefPool]
    spec: Any
    ds: Dataset
    raw_test: np.ndarray
    seed: int
    thief_x: np.ndarray | None = None
    n_classes: int = 0
    max_budget: int = 0
    _adaptive: dict[str, ThiefPool] = field(default_factory=dict, repr=False)

    def adaptive_pool(self, sc: str) -> ThiefPool:
        """An active learner needs more unlabelled points than it may query: its own, larger pool
        of the same scenario (seeded, built once)."""
        if sc not in self._adaptive:
            self._adaptive[sc] = make_pool(sc, ADAPTIVE_POOL_FACTOR * self.max_budget, self.ds.sample_shape,
                                           self.ds.value_range, self.thief_x, seed=self.seed, n_actions=self.n_classes)
        return self._adaptive[sc]


def _run_cell(ctx: CellContext, sc: str, attack: str, b: int, progress: Progress | None = None, done: int = 0,
              total: int = 0) -> list[RunResult]:
    """One scenario x attack x budget against every victim. Victims whose answers give the thief the
    same training data share one trained thief (seeded, one thread: the same thief either way)."""
    pool, seed = ctx.pools[sc], ctx.seed
    runs: list[RunResult] = []
    trained: dict[tuple, RunResult] = {}
    for vname, victim in ctx.victims.items():
        if progress:
            progress(done, total, f"{sc} / {vname} / {attack} / {b}")
        done += 1
        victim.new_attacker(f"thief-{sc}-{attack}-{b}-{seed}")
        key = _training_key(victim, pool.x[:b], attack, sc, b)
        if key is not None and key in trained:
            led = victim.ledger
            runs.append(dataclasses.replace(
                trained[key], victim=vname, queries_sent=led.sent, answered=led.answered,
                rejected=led.rejected, rate_limited=led.rate_limited, flagged=led.flagged,
                first_flagged_at=led.first_flagged_at, reused_from=trained[key].victim))
            continue
        victim.new_attacker(f"thief-{sc}-{attack}-{b}-{seed}")
        if attack in ADAPTIVE_ATTACKS:  # picks its b queries from the scenario's whole pool
            stolen = steal_adaptive(victim, ctx.adaptive_pool(sc).x, attack, ctx.spec, b, seed=seed)
        else:
            stolen = steal(victim, pool.x[:b], attack, ctx.spec, pool.actions[:b], seed=seed)
        pred = stolen.predict_labels(ctx.ds.x)
        led = victim.ledger
        run = RunResult(
            scenario=sc, victim=vname, attack=attack, budget=b, queries_sent=led.sent,
            answered=led.answered, rejected=led.rejected, rate_limited=led.rate_limited,
            flagged=led.flagged, first_flagged_at=led.first_flagged_at, trained_on=stolen.trained_on,
            labels_seen=stolen.labels_seen, fidelity=float((pred == ctx.raw_test).mean()),
            accuracy=float((pred == ctx.ds.y).mean()), seconds=round(stolen.seconds, 3),
        )
        runs.append(run)
        if key is not None:
            trained[key] = run
    return runs


def _grid_order(runs: list[RunResult], scenarios, victims, attacks, budgets) -> list[RunResult]:
    """Runs in the report's order: scenario, victim, attack, budget."""
    rank = {(sc, v, a, b): i for i, (sc, v, a, b) in enumerate(
        (sc, v, a, b) for sc in scenarios for v in victims for a in attacks for b in budgets)}
    return sorted(runs, key=lambda r: rank[(r.scenario, r.victim, r.attack, r.budget)])


def self_check(runs: Sequence[RunResult], budgets: Sequence[int]) -> SelfCheck:
    """The harness must steal the undefended model with in-distribution data; else it is broken."""
    top = max(budgets)
    cand = [r for r in runs if r.scenario == "in_dist" and r.victim == "bare" and r.budget == top]
    if not cand:
        return SelfCheck(None, None, SELF_CHECK_FIDELITY, None, None,
                         "not run: needs scenario 'in_dist' and victim 'bare' (harness unverified)")
    best = max(cand, key=lambda r: r.fidelity)
    ok = best.fidelity >= SELF_CHECK_FIDELITY
    msg = (f"bare model, in_dist, {best.attack} at {top} queries: fidelity {best.fidelity:.3f}"
           + ("" if ok else f" < {SELF_CHECK_FIDELITY}: extraction harness is broken "
                            f"(labels seen: {best.labels_seen}, trained on {best.trained_on})"))
    return SelfCheck(ok, best.fidelity, SELF_CHECK_FIDELITY, top, best.attack, msg)


# ----------------------------------------------------------------------------- HTTP victim


@dataclass
class HttpRun:
    """One extraction against a running API: every request accounted for, per key and in total."""

    url: str
    scenario: str
    attack: str
    budget: int
    keys: int
    ledger: dict
    per_key: list[dict]
    retry_after_max_s: float | None
    fidelity: float
    accuracy: float
    trained_on: int
    wall_seconds: float
    retries: int = 0  # 429s a patient thief waited out and resent (not in the ledger)
    waited_s: float = 0.0  # of wall_seconds, time spent waiting on Retry-After
    first_flagged_at: int | None = None  # the served extraction monitor's first flag (query number)

    def to_dict(self) -> dict:
        return asdict(self)


def run_http_extraction(
    base_url: str,
    model_path: str | Path,
    dataset: str | Path | Dataset,
    keys: Sequence[str],
    budget: int = 200,
    scenario: str = "in_dist",
    attack: str = "copycat",
    torch_source: str | Path | None = None,
    train_steps: int = 300,
    seed: int = 0,
    patience_s: float = 0.0,
) -> HttpRun:
    """Steal from a running edgeward API on loopback, rotating over ``keys`` (more than one = Sybil).
    The model file is read only to learn shapes and the raw labels fidelity is measured against.

    ``attack`` may be an adaptive thief (``ADAPTIVE_ATTACKS``, e.g. ``jbda+gate``): it then picks its
    ``budget`` queries from a pool of the scenario ``ADAPTIVE_POOL_FACTOR`` times larger. With
    ``patience_s`` the thief waits out 429s (see ``HttpVictim``): ``wall_seconds`` is then the
    time to spend the budget under the deployed rate limit."""
    import torch

    from attacks.victims import HttpVictim

    info = load_model(model_path)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    check_fits(info, ds)
    torch.set_num_threads(1)
    bare = build_victims(["bare"], make_session(model_path), info, ds.sample_shape)["bare"]
    raw_test = bare.labels(ds.x)  # type: ignore[attr-defined]
    spec = thief_spec_for(ds.sample_shape, info.num_classes, torch_source, train_steps=train_steps)
    if attack not in ATTACKS:
        raise InputError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    adaptive = attack in ADAPTIVE_ATTACKS
    pool = make_pool(scenario, budget * (ADAPTIVE_POOL_FACTOR if adaptive else 1), ds.sample_shape, ds.value_range,
                     _thief_data(ds, [scenario])[0], seed=seed, n_actions=info.num_classes)
    victim = HttpVictim(base_url, info.num_classes, ds.sample_shape, keys=list(keys), patience_s=patience_s)
    victim.new_attacker(f"http-{scenario}-{attack}-{budget}")
    t0 = time.perf_counter()
    if adaptive:
        stolen = steal_adaptive(victim, pool.x, attack, spec, budget, seed=seed)
    else:
        stolen = steal(victim, pool.x, attack, spec, pool.actions, seed=seed)
    pred = stolen.predict_labels(ds.x)
    return HttpRun(
        url=base_url, scenario=scenario, attack=attack, budget=budget, keys=len(keys),
        ledger=victim.ledger.to_dict(), per_key=[victim.per_key[i].to_dict() for i in sorted(victim.per_key)],
        retry_after_max_s=max(victim.retry_after) if victim.retry_after else None,
        fidelity=float((pred == raw_test).mean()), accuracy=float((pred == ds.y).mean()),
        trained_on=stolen.trained_on, wall_seconds=round(time.perf_counter() - t0, 2),
        retries=victim.retries, waited_s=round(victim.waited_s, 2), first_flagged_at=victim.ledger.first_flagged_at,
    )
