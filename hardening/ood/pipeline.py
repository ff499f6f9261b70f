"""``fit-ood`` and ``audit ood``: the release-time OOD workflow end to end.

Splits: detectors fit on ``x_train``; ``x_cal`` is shuffled (seeded) and halved:
the first half fits the per-detector normalisation, the second half sets the
split-conformal thresholds; the achieved false-rejection rate is then measured
on ``x`` (the test split), which none of the fitting steps saw.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from hardening.data import Dataset, load_dataset
from hardening.errors import DataError, InputError, ModelError
from hardening.intake import ModelInfo, check_fits, load_model, make_session
from hardening.ood.budget import GateBudget
from hardening.ood.calibration import DEFAULT_DELTA, DEFAULT_SLACK, check_alpha, false_rejection_rate, rate_interval
from hardening.ood.ensemble import DetectorEnsemble
from hardening.ood.evaluate import ENSEMBLE, OODAudit, family_metrics
from hardening.ood.export import export_detectors
from hardening.ood.families import build_families
from hardening.ood.graph import add_feature_output
from hardening.ood.plots import roc_plot
from hardening.ood.views import MAX_INPUT_VALUES, ModelViews, choose_input_view, compute_views
from runtime_guard.anomaly import AnomalyFormatError, AnomalyScorer, InputView

Progress = Callable[[str], None]


@dataclass
class PreparedModel:
    info: ModelInfo
    model_bytes: bytes  # with a feature output (edited in memory if needed; never written to disk)
    features_output: str
    features_tensor: str | None  # tensor exposed by graph edit, None if the model already had features
    input_view: InputView = field(default_factory=InputView)  # compact view the input detectors read
    _sess: ort.InferenceSession | None = field(default=None, init=False, repr=False)

    def views(self, x: np.ndarray) -> ModelViews:
        return compute_views(self._session(), self.info.input_name, self.info.logits_output, self.features_output, x,
                             input_view=self.input_view)

    def outputs(self, x: np.ndarray, batch: int = 256) -> ModelViews:
        """Like ``views`` but with the raw input kept (what the runtime scorer takes)."""
        v = compute_views(self._session(), self.info.input_name, self.info.logits_output, self.features_output, x, batch)
        return ModelViews(np.asarray(x, np.float32), v.logits, v.features)

    def _session(self) -> ort.InferenceSession:
        if self._sess is None:
            self._sess = make_session(self.model_bytes)
        return self._sess

    def model_meta(self) -> dict:
        return {
            "sha256": self.info.sha256,
            "input_name": self.info.input_name,
            "input_shape": list(self.info.input_shape),
            "logits_output": self.info.logits_output,
            "features_output": self.features_output,
            "features_tensor": self.features_tensor,
            "features_added_by_graph_edit": self.features_tensor is not None,
        }


def prepare_model(model_path: str | Path, ds: Dataset, features_tensor: str | None = None,
                  input_view: InputView | None = None, max_input_values: int = MAX_INPUT_VALUES) -> PreparedModel:
    """The model with a features output, and the compact input view: ``input_view`` as given
    (e.g. read back from a detector file), else chosen from the input shape (``choose_input_view``)."""
    info = load_model(model_path)
    check_fits(info, ds)
    view = input_view or choose_input_view(tuple(ds.x.shape[1:]), max_input_values)
    data = Path(model_path).read_bytes()
    if info.features_output is not None and features_tensor is None:
        return PreparedModel(info, data, info.features_output, None, view)
    edit = add_feature_output(data, info.input_name, info.logits_output, ds.x[:64], tensor=features_tensor, output_name="edgeward_features")
    return PreparedModel(info, edit.model_bytes, edit.features_output, edit.tensor, view)


@dataclass
class FitReport:
    alpha: float
    threshold: float | None
    conformal_k: int
    n_train: int
    n_norm: int
    n_threshold: int
    n_heldout: int
    heldout_frr: float  # achieved false-rejection rate of the fused score on x (test)
    heldout_frr_ci: tuple[float, float]  # its Clopper-Pearson 95% interval
    frr_slack: float  # guarantee: P(true FRR > alpha + slack) <= delta over calibration draws
    frr_delta: float
    detector_thresholds: dict[str, float | None]
    detector_heldout_frr: dict[str, float]
    fused: list[str]
    features_output: str
    features_tensor: str | None
    out_dir: str
    budget: dict = field(default_factory=dict)  # GateBudget and the per-request work it gave (detectors.json)

    def to_dict(self) -> dict:
        return asdict(self)


def _load_data(data: str | Path | Dataset) -> Dataset:
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    if ds.x_train is None or ds.x_cal is None:
        raise DataError(f"{ds.source}: fit-ood needs 'x_train'/'y_train' (to fit) and 'x_cal'/'y_cal' (to calibrate)")
    if len(ds.x_cal) < 4:
        raise DataError(f"{ds.source}: 'x_cal' has {len(ds.x_cal)} samples; need at least 4 to split for normalisation and threshold")
    return ds


def fit_ensemble(pm: PreparedModel, ds: Dataset, alpha: float, seed: int = 0, slack: float = DEFAULT_SLACK,
                 delta: float = DEFAULT_DELTA, budget: GateBudget | None = None) -> tuple[DetectorEnsemble, FitReport, ModelViews]:
    """Fit, normalise and calibrate on disjoint splits; also returns test-split views.
    ``budget`` bounds the detectors' matrices (the input view is ``pm``'s, see ``prepare_model``)."""
    alpha = check_alpha(alpha)
    train, cal, test = pm.views(ds.x_train), pm.views(ds.x_cal), pm.views(ds.x)
    perm = np.random.default_rng(seed).permutation(len(cal))
    half = len(cal) // 2
    norm_split, thr_split = cal.take(perm[:half]), cal.take(perm[half:])
    ens = DetectorEnsemble(input_view=pm.input_view, budget=budget)
    for det in ens.detectors.values():
        if "random_state" in det.get_params():
            det.set_params(random_state=seed)  # kNN bank subsampling
    ens.fit(train, ds.y_train).fit_normalisation(norm_split).calibrate(thr_split, alpha, slack, delta)
    by_det = ens.scores_by_detector(test)
    fused = ens.fuse(by_det)
    rejected = int(np.sum(fused > ens.threshold_))
    report = FitReport(
        alpha=alpha,
        threshold=ens.calibration_.to_dict()["threshold"],
        conformal_k=ens.calibration_.k,
        n_train=len(train),
        n_norm=len(norm_split),
        n_threshold=len(thr_split),
        n_heldout=len(test),
        heldout_frr=rejected / len(fused),
        heldout_frr_ci=rate_interval(rejected, len(fused)),
        frr_slack=ens.calibration_.slack,
        frr_delta=ens.calibration_.delta,
        detector_thresholds={n: c.to_dict()["threshold"] for n, c in ens.detector_calibration_.items()},
        detector_heldout_frr={n: false_rejection_rate(s, ens.detectors[n].threshold_) for n, s in by_det.items()},
        fused=list(ens.fused),
        features_output=pm.features_output,
        features_tensor=pm.features_tensor,
        out_dir="",
    )
    return ens, report, test


def fit_ood(
    model_path: str | Path,
    data: str | Path | Dataset,
    out_dir: str | Path,
    alpha: float = 0.05,
    features_tensor: str | None = None,
    seed: int = 0,
    slack: float = DEFAULT_SLACK,
    delta: float = DEFAULT_DELTA,
    budget: GateBudget | None = None,
) -> FitReport:
    """Fit and calibrate the gate; writes ``detectors.npz`` + ``detectors.json`` to ``out_dir``.

    ``data``: the ``.npz`` path or its loaded arrays (a ``Dataset``, as the full audit holds);
    ``budget``: the gate's per-request work (``GateBudget``; recorded in the file)."""
    budget = budget or GateBudget()
    ds = _load_data(data)
    pm = prepare_model(model_path, ds, features_tensor, max_input_values=budget.input_values)
    ens, report, _ = fit_ensemble(pm, ds, alpha, seed, slack, delta, budget)
    npz, meta = export_detectors(ens, model=pm.model_meta())
    report.budget = meta["budget"]
    meta["fit"] = {k: v for k, v in report.to_dict().items() if k not in ("out_dir", "budget")}
    report.out_dir = str(AnomalyScorer.from_bytes(npz, meta).save(out_dir))
    return report


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def audit_ood(
    model_path: str | Path,
    data: str | Path | Dataset,
    detectors_dir: str | Path,
    out_dir: str | Path,
    *,
    families: dict[str, np.ndarray] | None = None,
    torch_source: str | None = None,
    adversarial: np.ndarray | None = None,
    adversarial_name: str = "adversarial",
    adv_eps: float = 0.3,
    n_synthetic: int = 500,
    seed: int = 0,
    plots: bool = True,
    progress: Progress | None = None,
) -> OODAudit:
    """Score every family with the exported (runtime) scorer: what is audited is what ships.

    ``families``: score exactly these (name -> inputs; e.g. one family per shard) instead of
    building them here; ``data`` is the ``.npz`` path or a loaded ``Dataset``."""
    say = progress or (lambda _m: None)
    try:
        scorer = AnomalyScorer.load(detectors_dir)
    except AnomalyFormatError as e:
        raise InputError(f"{detectors_dir}: unusable detectors ({e})") from None
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    mm = scorer.meta.get("model") or {}
    pm = prepare_model(model_path, ds, mm.get("features_tensor"), input_view=scorer.input_view)
    if mm.get("sha256") and mm["sha256"] != pm.info.sha256:
        raise ModelError(f"{model_path}: detectors in {detectors_dir} were fitted for a different model (sha256 {mm['sha256'][:12]}...)")
    if families is None:
        say("building OOD families")
    fams = families if families is not None else build_families(ds, num_classes=pm.info.num_classes or int(ds.y.max()) + 1, torch_source=torch_source,
                          adversarial=adversarial, adversarial_name=adversarial_name, adv_eps=adv_eps, n=n_synthetic, seed=seed)

    def scores(x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
        parts = []
        for i in range(0, len(x), batch):  # bounded memory: raw inputs go to the runtime scorer per batch
            v = pm.outputs(x[i : i + batch])
            parts.append(scorer.scores_by_detector(v.input, v.logits, v.features))
        by = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        by[ENSEMBLE] = scorer.fuse(by)
        return by

    thr = {**scorer.detector_thresholds, ENSEMBLE: scorer.threshold}
    id_s = scores(ds.x)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audit = OODAudit(
        alpha=scorer.alpha,
        threshold=None if np.isinf(scorer.threshold) else scorer.threshold,
        n_id=len(ds.x),
        id_frr={n: false_rejection_rate(s, thr[n]) for n, s in id_s.items()},
    )
    for fam, x in fams.items():
        say(f"scoring family {fam} ({len(x)} inputs)")
        ood_s = scores(x)
        for det in id_s:
            audit.metrics.append(family_metrics(fam, det, id_s[det], ood_s[det], thr[det]))
        if plots:
            audit.plots.append(str(roc_plot(fam, id_s, ood_s, scorer.alpha, out / f"roc_{_safe(fam)}.png")))
    return audit
