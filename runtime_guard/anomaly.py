"""On-device anomaly gate: numpy-only scoring of detectors fitted by ``edgeward fit-ood``.

Reads ``detectors.npz`` (plain float arrays, never pickled) and
``detectors.json`` (kinds, normalisation, thresholds, fusion rule).

The scoring maths, in one place (``hardening.ood`` fits these parameters and any
differentiable copy of the gate mirrors these formulas):

* Sign convention: **higher score = more anomalous**, for every detector and for
  the fused score; an input is anomalous when its fused score is above
  ``threshold`` (+inf when the calibration split was too small for the chosen
  false-rejection rate: then nothing is rejected).
* Detector scores ``s`` on one view ``v`` (a row; views: input, logits, features):

  - ``msp``:         ``1 - max_c softmax(v / T)_c``
  - ``energy``:      ``-T * logsumexp(v / T)``
  - ``mahalanobis``: ``min_c (v - mu_c)^T P (v - mu_c)`` (shared precision ``P``)
  - ``knn`` / ``input_knn``: Euclidean distance to the k-th nearest bank row
    (``v`` scaled to unit norm first when ``normalize``, the ``knn`` default)
  - ``pca``:         ``|r|^2`` with ``r = (v - m) - ((v - m) W^T) W`` (reconstruction error)
* Normalisation per detector: ``z = (s - mean) / std`` (in-distribution statistics).
* Fusion over the ``members`` (``fusion.rule``):

  - ``mean_z``:     ``mean_i z_i`` (legacy; a detector that finds an input more typical
    than typical, z << 0, cancels the others)
  - ``mean_pos_z``: ``mean_i max(z_i, 0)`` (one-sided: a detector can only add evidence)
  - ``max_z``:      ``max_i z_i``

Every detector has one vectorised implementation below (``Detector.raw``); the
guard, the audits, ``hardening.ood``'s fitted detectors (``score_samples``) and
the tests all score through it.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import LoadError, RequestError

FORMAT = "edgeward-ood/1"
VIEWS = ("input", "logits", "features")
NPZ_NAME, JSON_NAME = "detectors.npz", "detectors.json"
FUSION_RULES = ("mean_z", "mean_pos_z", "max_z")

__all__ = ["AnomalyScorer", "AnomalyFormatError", "AnomalyInputError", "FORMAT", "FUSION_RULES",
           "Detector", "build_detector", "fuse_z"]


class AnomalyFormatError(LoadError, ValueError):
    """The exported detectors are malformed, incomplete or of an unknown kind."""

    check = "detectors"


class AnomalyInputError(RequestError, ValueError):
    """The arrays passed to ``score`` do not fit the detectors (missing view, wrong width, NaN)."""

    check = "detector-input"


def fuse_z(z: np.ndarray, rule: str) -> np.ndarray:
    """Fused score from the members' z-scores ``z`` (n, k) by ``rule`` (module docstring)."""
    if rule == "mean_z":
        res: np.ndarray = z.sum(axis=1) / z.shape[1]
    elif rule == "mean_pos_z":
        res = np.maximum(z, 0.0).sum(axis=1) / z.shape[1]
    elif rule == "max_z":
        res = z.max(axis=1)
    else:
        raise AnomalyFormatError(f"unknown fusion rule {rule!r}")
    return res


def _need(arrays: dict[str, np.ndarray], name: str, key: str, ndim: int) -> np.ndarray:
    arr = arrays.get(f"{name}__{key}")
    if arr is None:
        raise AnomalyFormatError(f"detector '{name}': array '{key}' missing from npz")
    if arr.ndim != ndim or arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
        raise AnomalyFormatError(f"detector '{name}': array '{key}' must be a finite float array of rank {ndim}")
    return arr.astype(np.float64, copy=False)


def _threshold(v: object, what: str) -> float:
    if v is None:
        return math.inf
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise AnomalyFormatError(f"{what} must be a finite number or null (= +inf)")
    return float(v)


@dataclass
class Detector:
    """One exported detector: its view, normalisation and threshold; ``raw`` is its maths."""

    kinds: ClassVar[tuple[str, ...]] = ()
    name: str
    view: str
    mean: float
    std: float
    threshold: float
    width: int | None = None  # values per sample of the view (None = any)

    def raw(self, v: np.ndarray) -> np.ndarray:
        """Score per row of ``v`` (n, width), float64; higher = more anomalous."""
        raise NotImplementedError

    def z(self, v: np.ndarray) -> np.ndarray:
        res: np.ndarray = (self.raw(v) - self.mean) / self.std
        return res


@dataclass
class Softmax(Detector):
    """``msp`` and ``energy`` on logits."""

    kinds = ("msp", "energy")
    kind: str = "msp"
    temperature: float = 1.0

    def raw(self, v: np.ndarray) -> np.ndarray:
        t = self.temperature
        zz = v / t if t != 1.0 else v
        top = zz.max(axis=1)
        total = np.exp(zz - top[:, None]).sum(axis=1)  # softmax denominator over exp(max)
        res: np.ndarray
        if self.kind == "msp":  # the top class's probability is exp(0) / total
            res = 1.0 - 1.0 / total
        else:  # -T * logsumexp(v / T)
            res = -t * (top + np.log(total))
        return res


@dataclass
class Mahalanobis(Detector):
    kinds = ("mahalanobis",)
    means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)
    precision: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    def __post_init__(self) -> None:
        self._mp = self.means @ self.precision  # (C, D)
        self._c = (self._mp * self.means).sum(axis=1)  # mu P mu

    def raw(self, v: np.ndarray) -> np.ndarray:
        vpv = ((v @ self.precision) * v).sum(axis=1, keepdims=True)
        res: np.ndarray = (vpv - 2.0 * (v @ self._mp.T) + self._c).min(axis=1)
        return res


@dataclass
class Knn(Detector):
    kinds = ("knn", "input_knn")
    bank: np.ndarray = field(default_factory=lambda: np.zeros((1, 0)), repr=False)
    n_neighbors: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        self._bank_sq = (self.bank * self.bank).sum(axis=1)
        self._bank_t = np.ascontiguousarray(self.bank.T)

    def raw(self, v: np.ndarray) -> np.ndarray:
        if self.normalize:
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        k = self.n_neighbors
        # |v|^2 is added after the selection: it shifts a whole row and cannot change the order
        part = self._bank_sq - 2.0 * (v @ self._bank_t)
        if k == 1:
            kth = part.min(axis=1)
        else:
            kth = np.partition(part, k - 1, axis=1)[:, k - 1] if k < part.shape[1] else part.max(axis=1)
        res: np.ndarray = np.sqrt(np.maximum(kth + (v * v).sum(axis=1), 0.0))
        return res


@dataclass
class Pca(Detector):
    kinds = ("pca",)
    center: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    components: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    def raw(self, v: np.ndarray) -> np.ndarray:
        c = v - self.center
        r = c - (c @ self.components.T) @ self.components
        res: np.ndarray = (r * r).sum(axis=1)
        return res


def build_detector(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Detector:
    """The runtime detector for one ``detectors.json`` entry and its ``{name}__{key}`` arrays
    (``hardening.ood.detectors`` builds its scorers with this too)."""
    try:
        name, kind, view = str(spec["name"]), str(spec["kind"]), str(spec["view"])
        mean, std = float(spec["norm"]["mean"]), float(spec["norm"]["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise AnomalyFormatError(f"malformed detector entry ({type(e).__name__}: {e})") from None
    threshold = _threshold(spec.get("threshold"), f"detector '{name}' threshold")
    if view not in VIEWS:
        raise AnomalyFormatError(f"detector '{name}': unknown view {view!r}")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise AnomalyFormatError(f"detector '{name}': normalisation must be finite with std > 0")
    params = spec.get("params") or {}
    base: dict[str, Any] = {"name": name, "view": view, "mean": mean, "std": std, "threshold": threshold}
    det: Detector
    if kind in Softmax.kinds:
        t = float(params.get("temperature", 1.0))
        if not t > 0:
            raise AnomalyFormatError(f"detector '{name}': temperature must be > 0")
        det = Softmax(**base, kind=kind, temperature=t)
    elif kind in Mahalanobis.kinds:
        means, prec = _need(arrays, name, "means", 2), _need(arrays, name, "precision", 2)
        d = means.shape[1]
        if prec.shape != (d, d):
            raise AnomalyFormatError(f"detector '{name}': precision shape {prec.shape} does not fit means {means.shape}")
        det = Mahalanobis(**base, width=d, means=means, precision=prec)
    elif kind in Knn.kinds:
        bank = _need(arrays, name, "bank", 2)
        k = int(params.get("n_neighbors", 1))
        if not 1 <= k <= len(bank):
            raise AnomalyFormatError(f"detector '{name}': n_neighbors={k} needs 1..{len(bank)}")
        det = Knn(**base, width=bank.shape[1], bank=bank, n_neighbors=k,
                  normalize=bool(params.get("normalize", kind == "knn")))
    elif kind in Pca.kinds:
        mean_v, comp = _need(arrays, name, "mean", 1), _need(arrays, name, "components", 2)
        if comp.shape[1] != mean_v.shape[0]:
            raise AnomalyFormatError(f"detector '{name}': components {comp.shape} do not fit mean {mean_v.shape}")
        det = Pca(**base, width=mean_v.shape[0], center=mean_v, components=comp)
    else:
        raise AnomalyFormatError(f"detector '{name}': unknown kind {kind!r}")
    declared = spec.get("width")
    if declared is not None:
        if det.width is not None and declared != det.width:
            raise AnomalyFormatError(f"detector '{name}': width {declared} does not fit its arrays ({det.width})")
        det.width = int(declared)
    return det


class AnomalyScorer:
    """Fused anomaly score of the exported detectors (formulas: module docstring)."""

    def __init__(self, npz_bytes: bytes, meta: dict[str, Any], dets: list[Detector], rule: str,
                 members: list[str]) -> None:
        self.npz_bytes = npz_bytes
        self.meta = meta
        self.detectors = dets
        self.rule = rule
        self._fused = [d for d in dets if d.name in members]
        self._norm_mean = np.array([d.mean for d in self._fused])
        self._norm_std = np.array([d.std for d in self._fused])
        self.threshold: float = _threshold(meta.get("threshold"), "threshold")
        alpha = meta.get("alpha")
        self.alpha: float = float(alpha) if isinstance(alpha, (int, float)) else float("nan")
        self.needs: frozenset[str] = frozenset(d.view for d in dets)

    # ---- loading -------------------------------------------------------
    @classmethod
    def from_bytes(cls, npz_bytes: bytes, meta: dict[str, Any]) -> AnomalyScorer:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AnomalyFormatError(f"detector meta must be a dict with format {FORMAT!r}")
        try:
            with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise AnomalyFormatError(f"detector arrays are not a readable npz ({type(e).__name__})") from None
        fusion = meta.get("fusion") or {}
        rule = fusion.get("rule")
        if rule not in FUSION_RULES:
            raise AnomalyFormatError(f"unknown fusion rule {rule!r}")
        members = list(dict.fromkeys(fusion.get("members") or []))
        dets = [build_detector(spec, arrays) for spec in meta.get("detectors") or []]
        names = [d.name for d in dets]
        if len(set(names)) != len(names) or not members or not set(members) <= set(names):
            raise AnomalyFormatError(f"fusion members {sorted(members)} must be unique detector names from {names}")
        for view in VIEWS:
            widths = {d.width for d in dets if d.view == view and d.width is not None}
            if len(widths) > 1:
                raise AnomalyFormatError(f"detectors of the {view!r} view disagree on its width")
        return cls(npz_bytes, meta, dets, str(rule), members)

    @classmethod
    def load(cls, directory: str | Path) -> AnomalyScorer:
        d = Path(directory)
        try:
            data = (d / NPZ_NAME).read_bytes()
            meta = json.loads((d / JSON_NAME).read_text())
        except FileNotFoundError as e:
            raise AnomalyFormatError(f"{directory}: missing {Path(e.filename).name}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AnomalyFormatError(f"{d / JSON_NAME}: invalid JSON ({e})") from None
        except OSError as e:
            raise AnomalyFormatError(f"{directory}: unreadable detectors ({e.strerror})") from None
        return cls.from_bytes(data, meta)

    def save(self, directory: str | Path) -> Path:
        """Write ``detectors.npz`` + ``detectors.json`` (what ``load`` reads back)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / NPZ_NAME).write_bytes(self.npz_bytes)
        (d / JSON_NAME).write_text(json.dumps(self.meta, indent=2, allow_nan=False))
        return d

    # ---- scoring -------------------------------------------------------
    def _views(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None,
               dets: list[Detector]) -> dict[str, np.ndarray]:
        """Each needed view once: float64, (n, width), finite, same n everywhere."""
        raw = {"input": x, "logits": logits, "features": features}
        out: dict[str, np.ndarray] = {}
        n = None
        for view in dict.fromkeys(d.view for d in dets):
            arr = raw[view]
            if arr is None:
                who = next(d.name for d in dets if d.view == view)
                raise AnomalyInputError(f"detector '{who}' needs the {view!r} array")
            arr = np.asarray(arr)
            if arr.ndim < 2:
                raise AnomalyInputError(f"{view} must be batched (n, ...), got shape {arr.shape}")
            arr = arr.reshape(len(arr), -1).astype(np.float64)
            if not np.isfinite(arr).all():
                raise AnomalyInputError(f"{view} holds NaN/Inf values")
            if n is not None and len(arr) != n:
                raise AnomalyInputError(f"{view} has {len(arr)} samples, other arrays have {n}")
            n = len(arr)
            out[view] = arr
        for d in dets:
            if d.width is not None and out[d.view].shape[1] != d.width:
                raise AnomalyInputError(f"detector '{d.name}': {d.view} has {out[d.view].shape[1]} values per sample, expected {d.width}")
        return out

    def scores_by_detector(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> dict[str, np.ndarray]:
        """Raw score of every detector (float64, one per sample)."""
        views = self._views(x, logits, features, self.detectors)
        return {d.name: d.raw(views[d.view]) for d in self.detectors}

    def fuse(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """Fused score from raw per-detector scores (only the members are used)."""
        z = np.stack([(np.asarray(scores[d.name], np.float64) - d.mean) / d.std for d in self._fused], axis=1)
        return fuse_z(z, self.rule)

    def score(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> np.ndarray:
        """Fused score per sample (float64); only the fused detectors run. Compare with ``threshold``.
        Raises ``AnomalyInputError`` when the arrays do not fit the detectors."""
        views = self._views(x, logits, features, self._fused)
        z = np.stack([d.raw(views[d.view]) for d in self._fused], axis=1)
        z -= self._norm_mean
        z /= self._norm_std
        return fuse_z(z, self.rule)

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        res: np.ndarray = np.asarray(scores, dtype=np.float64) > self.threshold
        return res

    @property
    def detector_thresholds(self) -> dict[str, float]:
        return {d.name: d.threshold for d in self.detectors}

    @property
    def detector_names(self) -> list[str]:
        return [d.name for d in self.detectors]
