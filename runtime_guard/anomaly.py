"""On-device anomaly gate: numpy-only scoring of detectors fitted by ``edgeward fit-ood``.

Reads ``detectors.npz`` (plain float arrays, never pickled) and
``detectors.json`` (kinds, normalisation, thresholds, fusion rule). Convention:
**higher score = more anomalous**; an input is anomalous when its fused score is
above ``threshold`` (``threshold`` is +inf when the calibration split was too
small for the chosen false-rejection rate: then nothing is rejected).

No scikit-learn, scipy or torch here; every matrix the scoring needs
(precision-weighted class means, normalised kNN bank, PCA basis) is prepared
once in ``from_bytes`` so batch-1 scoring is a few small matrix products.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMAT = "edgeward-ood/1"
VIEWS = ("input", "logits", "features")
NPZ_NAME, JSON_NAME = "detectors.npz", "detectors.json"

__all__ = ["AnomalyScorer", "AnomalyFormatError", "AnomalyInputError", "FORMAT"]


class AnomalyFormatError(ValueError):
    """The exported detectors are malformed, incomplete or of an unknown kind."""


class AnomalyInputError(ValueError):
    """The arrays passed to ``score`` do not fit the detectors (missing view, wrong width, NaN)."""


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def _kth_distance(q: np.ndarray, bank_t: np.ndarray, bank_sq: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance to the k-th nearest bank row; |q|^2 is added after the
    selection because it shifts a whole row and cannot change the order."""
    part = bank_sq[None, :] - 2.0 * (q @ bank_t)
    if k == 1:
        kth = part.min(axis=1)
    else:
        kth = np.partition(part, k - 1, axis=1)[:, k - 1] if k < part.shape[1] else part.max(axis=1)
    return np.sqrt(np.maximum(kth + (q * q).sum(axis=1), 0.0))


def _need(arrays: dict[str, np.ndarray], name: str, key: str, ndim: int) -> np.ndarray:
    arr = arrays.get(f"{name}__{key}")
    if arr is None:
        raise AnomalyFormatError(f"detector '{name}': array '{key}' missing from npz")
    if arr.ndim != ndim or arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
        raise AnomalyFormatError(f"detector '{name}': array '{key}' must be a finite float array of rank {ndim}")
    return arr.astype(np.float64, copy=False)


def _build(kind: str, name: str, params: dict, arrays: dict[str, np.ndarray]) -> tuple[Callable[[np.ndarray], np.ndarray], int | None]:
    """Return (score function on one view, expected width or None)."""
    if kind in ("msp", "energy"):
        t = float(params.get("temperature", 1.0))
        if not t > 0:
            raise AnomalyFormatError(f"detector '{name}': temperature must be > 0")
        if kind == "msp":
            def msp(z: np.ndarray) -> np.ndarray:
                zz = z / t
                return 1.0 - np.exp(zz.max(axis=1) - _logsumexp(zz))
            return msp, None
        return (lambda z: -t * _logsumexp(z / t)), None
    if kind == "mahalanobis":
        means, prec = _need(arrays, name, "means", 2), _need(arrays, name, "precision", 2)
        d = means.shape[1]
        if prec.shape != (d, d):
            raise AnomalyFormatError(f"detector '{name}': precision shape {prec.shape} does not fit means {means.shape}")
        mp = means @ prec  # (C, D)
        c = (mp * means).sum(axis=1)  # mu P mu

        def maha(f: np.ndarray) -> np.ndarray:
            fpf = ((f @ prec) * f).sum(axis=1, keepdims=True)
            return (fpf - 2.0 * (f @ mp.T) + c).min(axis=1)
        return maha, d
    if kind in ("knn", "input_knn"):
        bank = _need(arrays, name, "bank", 2)
        k = int(params.get("n_neighbors", 1))
        normalize = bool(params.get("normalize", kind == "knn"))
        if not 1 <= k <= len(bank):
            raise AnomalyFormatError(f"detector '{name}': n_neighbors={k} needs 1..{len(bank)}")
        bank_sq = (bank * bank).sum(axis=1)
        bank_t = np.ascontiguousarray(bank.T)

        def knn(f: np.ndarray) -> np.ndarray:
            if normalize:
                f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
            return _kth_distance(f, bank_t, bank_sq, k)
        return knn, bank.shape[1]
    if kind == "pca":
        mean, comp = _need(arrays, name, "mean", 1), _need(arrays, name, "components", 2)
        if comp.shape[1] != mean.shape[0]:
            raise AnomalyFormatError(f"detector '{name}': components {comp.shape} do not fit mean {mean.shape}")

        def pca(x: np.ndarray) -> np.ndarray:
            c = x - mean
            r = c - (c @ comp.T) @ comp
            return (r * r).sum(axis=1)
        return pca, mean.shape[0]
    raise AnomalyFormatError(f"detector '{name}': unknown kind {kind!r}")


def _threshold(v: object, what: str) -> float:
    if v is None:
        return math.inf
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise AnomalyFormatError(f"{what} must be a finite number or null (= +inf)")
    return float(v)


class _Det:
    __slots__ = ("name", "kind", "view", "fn", "width", "mean", "std", "threshold", "fused")


class AnomalyScorer:
    """Fused anomaly score of the exported detectors; see module docstring for the convention."""

    def __init__(self, npz_bytes: bytes, meta: dict, dets: list[_Det]) -> None:
        self.npz_bytes = npz_bytes
        self.meta = meta
        self._dets = dets
        self._fused = [d for d in dets if d.fused]
        self.threshold: float = _threshold(meta.get("threshold"), "threshold")
        alpha = meta.get("alpha")
        self.alpha: float = float(alpha) if isinstance(alpha, (int, float)) else float("nan")
        self.needs: frozenset[str] = frozenset(d.view for d in dets)

    # ---- loading -------------------------------------------------------
    @classmethod
    def from_bytes(cls, npz_bytes: bytes, meta: dict) -> AnomalyScorer:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise AnomalyFormatError(f"detector meta must be a dict with format {FORMAT!r}")
        try:
            with np.load(io.BytesIO(npz_bytes), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise AnomalyFormatError(f"detector arrays are not a readable npz ({type(e).__name__})") from None
        fusion = meta.get("fusion") or {}
        if fusion.get("rule") != "mean_z":
            raise AnomalyFormatError(f"unknown fusion rule {fusion.get('rule')!r}")
        members = set(fusion.get("members") or [])
        dets: list[_Det] = []
        for spec in meta.get("detectors") or []:
            try:
                d = _Det()
                d.name, d.kind, d.view = str(spec["name"]), str(spec["kind"]), str(spec["view"])
                d.mean, d.std = float(spec["norm"]["mean"]), float(spec["norm"]["std"])
                d.threshold = _threshold(spec.get("threshold"), f"detector '{d.name}' threshold")
            except (KeyError, TypeError, ValueError) as e:
                raise AnomalyFormatError(f"malformed detector entry ({type(e).__name__}: {e})") from None
            if d.view not in VIEWS:
                raise AnomalyFormatError(f"detector '{d.name}': unknown view {d.view!r}")
            if not (math.isfinite(d.mean) and math.isfinite(d.std) and d.std > 0):
                raise AnomalyFormatError(f"detector '{d.name}': normalisation must be finite with std > 0")
            d.fn, d.width = _build(d.kind, d.name, spec.get("params") or {}, arrays)
            declared = spec.get("width")
            if declared is not None:
                if d.width is not None and declared != d.width:
                    raise AnomalyFormatError(f"detector '{d.name}': width {declared} does not fit its arrays ({d.width})")
                d.width = int(declared)
            d.fused = d.name in members
            dets.append(d)
        names = [d.name for d in dets]
        if len(set(names)) != len(names) or not members or not members <= set(names):
            raise AnomalyFormatError(f"fusion members {sorted(members)} must be unique detector names from {names}")
        return cls(npz_bytes, meta, dets)

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
    def _views(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None, dets: list[_Det]) -> dict[str, np.ndarray]:
        """Each needed view once: float64, (n, width), finite, same n everywhere."""
        raw = {"input": x, "logits": logits, "features": features}
        out: dict[str, np.ndarray] = {}
        n = None
        for view in dict.fromkeys(d.view for d in dets):
            arr = raw[view]
            if arr is None:
                who = next(d.name for d in dets if d.view == view)
                raise AnomalyInputError(f"detector '{who}' needs the {view!r} array")
            arr = np.asarray(arr, dtype=np.float64)
            if arr.ndim < 2:
                raise AnomalyInputError(f"{view} must be batched (n, ...), got shape {arr.shape}")
            arr = arr.reshape(len(arr), -1)
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

    def _scores(self, x, logits, features, dets: list[_Det]) -> dict[str, np.ndarray]:  # noqa: ANN001
        views = self._views(x, logits, features, dets)
        return {d.name: d.fn(views[d.view]) for d in dets}

    def scores_by_detector(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> dict[str, np.ndarray]:
        """Raw score of every detector (float64, one per sample)."""
        return self._scores(x, logits, features, self._dets)

    def fuse(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        total = 0.0
        for d in self._fused:
            total = total + (scores[d.name] - d.mean) / d.std
        return np.asarray(total / len(self._fused), dtype=np.float64)

    def score(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> np.ndarray:
        """Fused score per sample (float64); only the fused detectors run. Compare with ``threshold``."""
        return self.fuse(self._scores(x, logits, features, self._fused))

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) > self.threshold

    @property
    def detector_thresholds(self) -> dict[str, float]:
        return {d.name: d.threshold for d in self._dets}

    @property
    def detector_names(self) -> list[str]:
        return [d.name for d in self._dets]
