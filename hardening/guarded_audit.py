"""Adaptive evasion audit of the guarded model: attackers who know the anomaly gate.

``run_guarded_audit`` judges every attack on what ships: the ONNX session (with the
features output the detectors read) and the runtime ``AnomalyScorer`` loaded from the
exported detectors. The white-box attacker differentiates a torch copy of model and gate
(``attacks.gate_torch``), built from the float PyTorch source when it reproduces the
session, else from the ONNX graph itself; the copy is checked against the runtime score
on the audit points first. When it does not match, the white-box attacker is not run
and the result says so (``white_box_skipped``): guarded robust accuracy is then an upper
bound from the black-box attackers only.

``run_guarded_bundle_audit`` takes the gate from a signed bundle instead of a detectors
folder: signature verified and payloads decrypted in memory (``runtime_guard.bundle``), the
detectors and the shipped ``runtime`` policy (gate action) used as they would run on device.
A gate that only flags (``anomaly.action`` ``flag``) answers every input, so it stops no
evasion: the audit then judges with every input accepted and says so.

``multi_seed`` repeats an audit over seeds (different evaluation points and attack
randomness) and reports mean, min and max per epsilon.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attacks.adaptive_evasion import ATTACKERS, PROFILES, AdaptiveResult, run_adaptive
from attacks.gate_torch import GateCopyError, GuardedTorch, TorchGate, check_copy
from hardening.data import Dataset, load_dataset
from hardening.errors import InputError, ModelError
from runtime_guard.anomaly import AnomalyFormatError, AnomalyScorer

DEFAULT_EPS_FRACTIONS = (0.1, 0.2)  # of the data range, L-inf


@dataclass
class GuardedReport:
    model: str
    detectors: str
    norm: str
    profile: str
    n: int
    seed: int
    eps: list[float]
    attackers: list[str]
    gate_copy: dict  # CopyCheck of the torch copy against the runtime scorer, and its source
    white_box_skipped: str | None
    result: dict  # AdaptiveResult.to_dict()
    seconds: float
    bundle: dict | None = None  # with --guarded BUNDLE: version, gate action, output policy, note
    adversarial_examples: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("adversarial_examples")
        return d


class _TwoOutputs(nn.Module):
    """``(logits, features)`` from two torch copies of the same ONNX graph."""

    def __init__(self, logits: nn.Module, features: nn.Module | None) -> None:
        super().__init__()
        self.logits, self.features = logits, features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = None if self.features is None else self.features(x).reshape(len(x), -1)
        return self.logits(x), f


def _torch_copies(pm, torch_source: str | Path | None) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    if torch_source is not None:
        from hardening.torch_source import load_torch_source

        out.append(("torch source", load_torch_source(torch_source)))
    import onnx

    from attacks.onnx_torch import ConversionError, convert

    try:
        proto = onnx.load_from_string(pm.model_bytes)
        lg = convert(proto, pm.info.input_name, pm.info.logits_output, drop_activation=False).module
        ft = convert(proto, pm.info.input_name, pm.features_output, drop_activation=False).module
        out.append(("onnx graph copy", _TwoOutputs(lg, ft)))
    except ConversionError:
        pass
    return out


def load_bundle_gate(bundle: str | Path, public_key: str | Path, kek_file: str | Path) -> tuple[AnomalyScorer, dict]:
    """The shipped gate of a signed bundle: its scorer and what the runtime does with it."""
    from runtime_guard.bundle import load_kek, open_bundle
    from runtime_guard.config import GuardConfig, GuardConfigError
    from runtime_guard.errors import BundleError

    try:
        opened = open_bundle(bundle, public_key, load_kek(file=kek_file))
        cfg = GuardConfig.from_dict(opened.manifest.get("runtime", {}))
    except (BundleError, GuardConfigError) as e:
        raise InputError(f"{bundle}: cannot open the bundle ({type(e).__name__}: {e})") from None
    if cfg.anomaly.action == "off" or cfg.anomaly.detector_meta is None or "detectors.npz" not in opened.payloads:
        raise InputError(f"{bundle}: the bundle ships no anomaly gate (runtime.anomaly.action is "
                         f"{cfg.anomaly.action!r}); there is nothing to attack through")
    try:
        scorer = AnomalyScorer.from_bytes(opened.payloads["detectors.npz"], cfg.anomaly.detector_meta)
    except AnomalyFormatError as e:
        raise InputError(f"{bundle}: unusable detectors ({e})") from None
    import hashlib

    m = opened.manifest.get("model") or {}
    info = {"version": opened.version, "gate_action": cfg.anomaly.action, "output_policy": cfg.output.policy,
            "model_sha256": m.get("sha256"), "packaged_sha256": hashlib.sha256(opened.model_bytes).hexdigest(),
            "note": ("gate rejects: inputs it calls anomalous get no answer" if cfg.anomaly.action == "reject" else
                     "gate only flags: every input is answered, so the gate stops no evasion"),
            "judged_label": "top-1 of the logits (every output policy but adaptive_misinformation delivers it "
                            "unchanged; this one changes labels only of inputs the gate calls anomalous)"}
    return scorer, info


def run_guarded_bundle_audit(model_path: str | Path, dataset: str | Path | Dataset, bundle: str | Path,
                             public_key: str | Path, kek_file: str | Path, **kw) -> GuardedReport:
    """``run_guarded_audit`` with the gate and policy of a signed bundle (see the module docstring);
    ``model_path`` must be the model the bundle was made from (sha256 checked)."""
    from hardening.intake import load_model

    scorer, info = load_bundle_gate(bundle, public_key, kek_file)
    sha = load_model(model_path).sha256
    if sha not in (info["model_sha256"], info["packaged_sha256"]):
        raise ModelError(f"{model_path}: not the model in {bundle} (sha256 {sha[:12]}...)")
    rep = run_guarded_audit(model_path, dataset, str(bundle), scorer=scorer,
                            gate_rejects=info["gate_action"] == "reject", **kw)
    rep.bundle = info
    return rep


def multi_seed(run: Callable[[int], GuardedReport], seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Run ``run(seed)`` per seed; per epsilon the guarded, bare and non-adaptive robust accuracy
    per seed with their mean, min and max (the headline figure's spread)."""
    reps = [run(s) for s in seeds]
    out = []
    for i, e in enumerate(reps[0].result["eps"]):
        row: dict = {"eps": e["eps"]}
        for key in ("guarded_robust_accuracy", "bare_robust_accuracy", "non_adaptive_guarded_accuracy"):
            vals = [round(float(r.result["eps"][i][key]), 6) for r in reps]
            row[key] = {"per_seed": vals, "mean": round(float(np.mean(vals)), 6), "min": min(vals), "max": max(vals)}
        out.append(row)
    return {"seeds": list(seeds), "n": reps[0].n, "profile": reps[0].profile, "eps": out,
            "white_box_skipped": [r.white_box_skipped for r in reps], "seconds": sum(r.seconds for r in reps)}


def run_guarded_audit(
    model_path: str | Path,
    dataset: str | Path | Dataset,
    detectors_dir: str | Path,
    *,
    scorer: AnomalyScorer | None = None,
    gate_rejects: bool = True,
    torch_source: str | Path | None = None,
    eps: list[float] | None = None,
    n: int = 64,
    profile: str = "quick",
    seed: int = 0,
    attackers: tuple[str, ...] = ATTACKERS,
    progress: Callable[[str], None] | None = None,
) -> GuardedReport:
    """Guarded vs bare vs non-adaptive robust accuracy (L-inf) per eps; see the module docstring.
    ``scorer`` (already loaded, e.g. from a bundle) replaces ``detectors_dir``, which then only
    names the source; ``gate_rejects=False``: the gate answers everything (action ``flag``)."""
    from threadpoolctl import threadpool_limits

    from hardening.intake import make_session
    from hardening.ood.families import value_range
    from hardening.ood.pipeline import prepare_model

    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    unknown = [a for a in attackers if a not in ATTACKERS]
    if unknown or not attackers:
        raise InputError(f"unknown attacker(s) {unknown}; choose from {', '.join(ATTACKERS)}")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    t0 = time.perf_counter()
    if scorer is None:
        try:
            scorer = AnomalyScorer.load(detectors_dir)
        except AnomalyFormatError as e:
            raise InputError(f"{detectors_dir}: unusable detectors ({e})") from None
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    mm = scorer.meta.get("model") or {}
    pm = prepare_model(model_path, ds, mm.get("features_tensor"))
    if mm.get("sha256") and mm["sha256"] != pm.info.sha256:
        raise ModelError(f"{model_path}: detectors in {detectors_dir} were fitted for a different model")
    lo, hi = value_range(ds)
    eps_grid = sorted({float(e) for e in (eps or [f * (hi - lo) for f in DEFAULT_EPS_FRACTIONS])})
    if any(not (0 < e <= hi - lo) for e in eps_grid):
        raise InputError(f"epsilons {eps_grid} must be in (0, {hi - lo:g}] (the data range)")
    sess = make_session(pm.model_bytes)
    names = [pm.info.logits_output, pm.features_output]

    def judge(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(x) == 0:
            return np.zeros((0, pm.info.num_classes or 1), np.float32), np.zeros(0, bool)
        x = np.ascontiguousarray(x, dtype=np.float32)
        lg, ft = sess.run(names, {pm.info.input_name: x})
        if not gate_rejects:
            return lg.astype(np.float32), np.ones(len(x), bool)
        score = scorer.score(x.reshape(len(x), -1), lg, ft.reshape(len(ft), -1))
        return lg.astype(np.float32), ~scorer.is_anomalous(score)

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(ds.x), size=min(n, len(ds.x)), replace=False))
    x, y = ds.x[pick].astype(np.float32), ds.y[pick]
    pool = ds.x_cal if ds.x_cal is not None else ds.x_train if ds.x_train is not None else ds.x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            guarded, copy_info, skipped = None, {"source": None}, None
            lg, ft = sess.run(names, {pm.info.input_name: x})
            try:
                gate = TorchGate(scorer)
                for source, module in _torch_copies(pm, torch_source):
                    cand = GuardedTorch(module, gate)
                    try:
                        chk = check_copy(cand, scorer, x, lg, ft.reshape(len(ft), -1))
                    except (RuntimeError, ValueError, TypeError, GateCopyError) as e:
                        copy_info = {"source": source, "error": f"{type(e).__name__}: {e}"[:200]}
                        continue
                    copy_info = {"source": source, **asdict(chk)}
                    if chk.ok:
                        guarded = cand
                        break
                if guarded is None:
                    skipped = "no torch copy of model and gate reproduces the runtime score"
            except GateCopyError as e:
                skipped = str(e)
            run = tuple(a for a in attackers if a != "white-box" or guarded is not None)
            if not run:
                raise ModelError(f"white-box adaptive attack cannot run: {skipped}")
            res: AdaptiveResult = run_adaptive(guarded, judge, x, y, eps_grid, (lo, hi), pool, profile=profile,
                                               seed=seed, attackers=run, threshold=scorer.threshold,
                                               progress=progress)
    finally:
        torch.set_num_threads(threads)
    return GuardedReport(
        model=str(model_path), detectors=str(detectors_dir), norm="inf", profile=profile, n=len(x), seed=seed,
        eps=eps_grid, attackers=list(run), gate_copy=copy_info, white_box_skipped=skipped, result=res.to_dict(),
        seconds=time.perf_counter() - t0, adversarial_examples=res.adversarial_examples,
    )

