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
from typing import Any, NamedTuple

import numpy as np

from .errors import LoadError, RequestError

FORMAT = "edgeward-ood/1"
VIEWS = ("input", "logits", "features")
NPZ_NAME, JSON_NAME = "detectors.npz", "detectors.json"

__all__ = ["AnomalyScorer", "AnomalyFormatError", "AnomalyInputError", "FORMAT"]


class AnomalyFormatError(LoadError, ValueError):
    """The exported detectors are malformed, incomplete or of an unknown kind."""

    check = "detectors"


class AnomalyInputError(RequestError, ValueError):
    """The arrays passed to ``score`` do not fit the detectors (missing view, wrong width, NaN)."""

    check = "detector-input"


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    res: np.ndarray = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return res


def _kth_distance(q: np.ndarray, bank_t: np.ndarray, bank_sq: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance to the k-th nearest bank row; |q|^2 is added after the
    selection because it shifts a whole row and cannot change the order."""
    part = bank_sq[None, :] - 2.0 * (q @ bank_t)
    if k == 1:
        kth = part.min(axis=1)
    else:
        kth = np.partition(part, k - 1, axis=1)[:, k - 1] if k < part.shape[1] else part.max(axis=1)
    res: np.ndarray = np.sqrt(np.maximum(kth + (q * q).sum(axis=1), 0.0))
    return res


def _need(arrays: dict[str, np.ndarray], name: str, key: str, ndim: int) -> np.ndarray:
    arr = arrays.get(f"{name}__{key}")
    if arr is None:
        raise AnomalyFormatError(f"detector '{name}': array '{key}' missing from npz")
    if arr.ndim != ndim or arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
        raise AnomalyFormatError(f"detector '{name}': array '{key}' must be a finite float array of rank {ndim}")
    return arr.astype(np.float64, copy=False)


_Post = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
_reduceat = np.minimum.reduceat
_concat = np.concatenate
_TAIL1, _TAIL2 = np.array([1.0]), np.array([1.0, 0.0])  # the augmented row's constant entries


class _One(NamedTuple):
    """Batch-1 form of a detector on the augmented row ``[v, 1, |v|]``:
    ``block`` (width, m) multiplies ``v``; ``row_one``/``row_nrm`` (m,) are the
    rows for the constant 1 and for |v| (None = zeros); ``min_from`` is where, in
    the block's columns, a segment starts whose minimum the score needs (to the
    block's end; None = none): all views' minima come from one ``reduceat``.
    ``post(v, prod, vv, nrm, mn)`` gives the score as a float from the
    detector's slice of the product and that minimum."""

    block: np.ndarray | None
    row_one: np.ndarray | None
    row_nrm: np.ndarray | None
    post: Callable[..., float]
    min_from: int | None = None


def _build(kind: str, name: str, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Callable[[np.ndarray], np.ndarray], int | None, tuple[np.ndarray | None, _Post], _One | None]:
    """Return (score function on one view, expected width or None, fused-path spec, batch-1 spec).

    The fused-path spec is ``(block, post)``: ``block`` is a (width, m) matrix (or
    None) that ``score`` stacks with the other detectors' blocks of the same view,
    so one matrix product per view serves every detector; ``post(v, prod, vv)``
    turns the detector's slice of ``v @ stacked`` (and ``vv = |v|^2`` per row)
    into its score. Same maths as the plain function, regrouped. The batch-1
    spec (None where there is none) does the same on one row with the constant
    terms folded into the product, so the tail is a few scalar operations.
    """
    one: _One | None
    if kind in ("msp", "energy"):
        t = float(params.get("temperature", 1.0))
        if not t > 0:
            raise AnomalyFormatError(f"detector '{name}': temperature must be > 0")
        if kind == "msp":
            def msp(z: np.ndarray) -> np.ndarray:
                zz = z / t
                res: np.ndarray = 1.0 - np.exp(zz.max(axis=1) - _logsumexp(zz))
                return res

            def msp1(z: list[float], _p: object, _vv: float, _nrm: float, _mn: float) -> float:
                zz = [v / t for v in z]
                m = max(zz)
                return 1.0 - 1.0 / sum([math.exp(v - m) for v in zz])
            return msp, None, (None, lambda z, _p, _vv: msp(z)), _One(None, None, None, msp1)
        if t == 1.0:
            def energy(z: np.ndarray) -> np.ndarray:
                return -_logsumexp(z)
        else:
            def energy(z: np.ndarray) -> np.ndarray:
                return -t * _logsumexp(z / t)

        def energy1(z: list[float], _p: object, _vv: float, _nrm: float, _mn: float) -> float:
            zz = [v / t for v in z]
            m = max(zz)
            return -t * (m + math.log(sum([math.exp(v - m) for v in zz])))
        return energy, None, (None, lambda z, _p, _vv: energy(z)), _One(None, None, None, energy1)
    if kind == "mahalanobis":
        means, prec = _need(arrays, name, "means", 2), _need(arrays, name, "precision", 2)
        d = means.shape[1]
        if prec.shape != (d, d):
            raise AnomalyFormatError(f"detector '{name}': precision shape {prec.shape} does not fit means {means.shape}")
        mp = means @ prec  # (C, D)
        c = (mp * means).sum(axis=1)  # mu P mu

        def maha(f: np.ndarray) -> np.ndarray:
            fpf = ((f @ prec) * f).sum(axis=1, keepdims=True)
            res: np.ndarray = (fpf - 2.0 * (f @ mp.T) + c).min(axis=1)
            return res

        def maha_post(f: np.ndarray, prod: np.ndarray, _vv: np.ndarray) -> np.ndarray:
            # prod = f @ [P | -2 mp^T]; min_c(fPf - 2 f.mp_c + c_c) = fPf + min_c(c_c - 2 f.mp_c)
            part = prod[:, d:] + c
            res: np.ndarray = np.einsum("ij,ij->i", prod[:, :d], f) + np.minimum.reduce(part, axis=1)
            return res
        def maha1(f: np.ndarray, prod: np.ndarray, _vv: float, _nrm: float, mn: float) -> float:
            # prod = [f, 1] @ [[P, -2 mp^T], [0, c]]; mn = min of prod[d:]
            return float(prod[:d] @ f) + mn
        block = np.hstack([prec, -2.0 * mp.T])
        one = _One(block, np.concatenate([np.zeros(d), c]), None, maha1, d)
        return maha, d, (block, maha_post), one
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

        def knn_post(f: np.ndarray, prod: np.ndarray, vv: np.ndarray) -> np.ndarray:
            # prod = f @ (-2 bank^T); normalising f scales its row of prod and |f|^2
            if normalize:
                nrm = np.maximum(np.sqrt(vv), 1e-12)
                part = prod / nrm[:, None]
                vv = vv / (nrm * nrm)
            else:
                part = prod.copy() if k > 1 else prod
            part += bank_sq
            if k == 1:
                kth = np.minimum.reduce(part, axis=1)
            else:
                kth = np.partition(part, k - 1, axis=1)[:, k - 1] if k < part.shape[1] else part.max(axis=1)
            kth += vv
            res: np.ndarray = np.sqrt(np.maximum(kth, 0.0, out=kth), out=kth)
            return res
        def knn1(f: np.ndarray, prod: np.ndarray, vv: float, nrm: float, mn: float) -> float:
            # prod = [f, 1, nrm] @ [[-2 bank^T], [0 or bank_sq], [bank_sq or 0]]; mn = its min
            kth = mn / nrm + vv / (nrm * nrm) if normalize else mn + vv
            return math.sqrt(max(kth, 0.0))
        one = None
        if k == 1:
            one = (_One(-2.0 * bank_t, None, bank_sq, knn1, 0) if normalize
                   else _One(-2.0 * bank_t, bank_sq, None, knn1, 0))
        return knn, bank.shape[1], (-2.0 * bank_t, knn_post), one
    if kind == "pca":
        mean, comp = _need(arrays, name, "mean", 1), _need(arrays, name, "components", 2)
        if comp.shape[1] != mean.shape[0]:
            raise AnomalyFormatError(f"detector '{name}': components {comp.shape} do not fit mean {mean.shape}")

        def pca(x: np.ndarray) -> np.ndarray:
            c = x - mean
            r = c - (c @ comp.T) @ comp
            res: np.ndarray = (r * r).sum(axis=1)
            return res

        k_comp = comp.shape[0]
        mc = mean @ comp.T
        mm = float(mean @ mean)
        orthonormal = bool(np.abs(comp @ comp.T - np.eye(k_comp)).max() <= 1e-10)

        def pca_post(x: np.ndarray, prod: np.ndarray, vv: np.ndarray) -> np.ndarray:
            # prod = x @ [comp^T | mean]; proj = (x - mean) @ comp^T
            proj = prod[:, :k_comp] - mc
            res: np.ndarray
            if orthonormal:  # |r|^2 = |c|^2 - |proj|^2 for orthonormal rows
                res = (vv - 2.0 * prod[:, k_comp] + mm) - np.einsum("ij,ij->i", proj, proj)
            else:
                r = (x - mean) - proj @ comp
                res = (r * r).sum(axis=1)
            return res
        def pca1(x: np.ndarray, prod: np.ndarray, vv: float, _nrm: float, _mn: float) -> float:
            # prod = [x, 1] @ [[comp^T, -2 mean], [-mc, |mean|^2]] = [proj, |c|^2 - |x|^2]
            proj = prod[:k_comp]
            return vv + float(prod[k_comp]) - float(proj @ proj)
        one = None
        if orthonormal:
            one = _One(np.hstack([comp.T, -2.0 * mean[:, None]]), np.concatenate([-mc, [mm]]), None, pca1)
        return pca, mean.shape[0], (np.hstack([comp.T, mean[:, None]]), pca_post), one
    raise AnomalyFormatError(f"detector '{name}': unknown kind {kind!r}")


def _threshold(v: object, what: str) -> float:
    if v is None:
        return math.inf
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise AnomalyFormatError(f"{what} must be a finite number or null (= +inf)")
    return float(v)


class _Det:
    __slots__ = ("name", "kind", "view", "fn", "width", "mean", "std", "threshold", "fused", "fast", "one")
    name: str
    kind: str
    view: str
    fn: Callable[[np.ndarray], np.ndarray]  # score on one view, plain numpy
    width: int | None  # expected width of the view (None = any)
    mean: float  # normalisation: z = (score - mean) / std
    std: float
    threshold: float
    fused: bool  # a member of the fusion rule
    fast: tuple[np.ndarray | None, _Post]  # fused-path spec (block, post)
    one: _One | None  # batch-1 spec


# _FusedPlan's per-view plans: (column, post, start, stop) per member; the batch-1 form
# adds the member's minimum position, and the view its augmented matrix and reduceat indices
_Member = tuple[int, _Post, int, int]
_OneMember = tuple[int, Callable[..., float], int, int, int | None]
_ViewPlan = tuple[int, int | None, np.ndarray | None, list[_Member]]
_OnePlan = tuple[int, int | None, np.ndarray | None, bool, np.ndarray | None, list[_OneMember]]


class _FusedPlan:
    """Precomputed fused scoring: per view one stacked matrix (every fused
    detector's linear part side by side), so a batch-1 score is one BLAS call
    per view plus a few vector ops; fusion is one dot with the z-weights."""

    __slots__ = ("views", "weights", "bias", "k", "ones", "wlist")

    def __init__(self, fused: list[_Det]) -> None:
        self.k = len(fused)
        # z_i = (s_i - mean_i) / std_i; fused = mean of z = S @ weights + bias
        self.weights = np.array([1.0 / (d.std * self.k) for d in fused])
        self.bias = -sum(d.mean / (d.std * self.k) for d in fused)
        # (view index, width, stacked matrix | None, [(column, post, start, stop)])
        self.views: list[_ViewPlan] = []
        for view in dict.fromkeys(d.view for d in fused):
            cols = [(i, d) for i, d in enumerate(fused) if d.view == view]
            widths = {d.width for _, d in cols if d.width is not None}
            if len(widths) > 1:
                raise AnomalyFormatError("detectors of one view disagree on its width")
            blocks = [d.fast[0] for _, d in cols if d.fast[0] is not None]
            matrix = np.ascontiguousarray(np.hstack(blocks)) if blocks else None
            members: list[_Member] = []
            start = 0
            for i, d in cols:
                stop = start + (d.fast[0].shape[1] if d.fast[0] is not None else 0)
                members.append((i, d.fast[1], start, stop))
                start = stop
            self.views.append((VIEWS.index(view), next(iter(widths), None), matrix, members))
        self.wlist = self.weights.tolist()
        self.ones = self._batch_one(fused)

    def _batch_one(self, fused: list[_Det]) -> list[_OnePlan] | None:
        """Per view: (view index, width, augmented matrix [v, 1(, |v|)] or None,
        needs |v|, reduceat indices or None, [(column, post, start, stop, min position)]);
        None if a detector has no batch-1 form."""
        ones: list[_One] = []
        for d in fused:
            if d.one is None:
                return None
            ones.append(d.one)
        out: list[_OnePlan] = []
        for vi, width, _m, _members in self.views:
            cols = [(i, ones[i]) for i, d in enumerate(fused) if VIEWS.index(d.view) == vi]
            blocks = [one for _, one in cols if one.block is not None]
            if not blocks:
                out.append((vi, width, None, False, None, [(i, one.post, 0, 0, None) for i, one in cols]))
                continue
            need_nrm = any(b.row_nrm is not None for b in blocks)
            parts: list[np.ndarray] = []
            members: list[_OneMember] = []
            segs: list[int] = []
            start = 0
            for i, b in cols:
                if b.block is None:
                    members.append((i, b.post, 0, 0, None))
                    continue
                m = b.block.shape[1]
                rows = [b.block, (b.row_one if b.row_one is not None else np.zeros(m))[None, :]]
                if need_nrm:
                    rows.append((b.row_nrm if b.row_nrm is not None else np.zeros(m))[None, :])
                parts.append(np.vstack(rows))
                mpos = None
                if b.min_from is not None:  # segment [start + min_from, start + m)
                    mpos = len(segs)
                    segs += [start + b.min_from, start + m]
                members.append((i, b.post, start, start + m, mpos))
                start += m
            # reduceat over [s0, e0, s1, e1, ...]: a segment's minimum sits where its start is
            idx = [p for p in segs if p < start] or None
            out.append((vi, width, np.ascontiguousarray(np.hstack(parts)), need_nrm,
                        np.array(idx, dtype=np.intp) if idx else None, members))
        return out


class AnomalyScorer:
    """Fused anomaly score of the exported detectors; see module docstring for the convention."""

    def __init__(self, npz_bytes: bytes, meta: dict[str, Any], dets: list[_Det]) -> None:
        self.npz_bytes = npz_bytes
        self.meta = meta
        self._dets = dets
        self._fused = [d for d in dets if d.fused]
        try:
            self._plan: _FusedPlan | None = _FusedPlan(self._fused)
        except ValueError:  # inconsistent widths: the checked path raises the right error
            self._plan = None
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
            d.fn, d.width, d.fast, d.one = _build(d.kind, d.name, spec.get("params") or {}, arrays)
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

    def _scores(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None,
                dets: list[_Det]) -> dict[str, np.ndarray]:
        views = self._views(x, logits, features, dets)
        return {d.name: d.fn(views[d.view]) for d in dets}

    def scores_by_detector(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> dict[str, np.ndarray]:
        """Raw score of every detector (float64, one per sample)."""
        return self._scores(x, logits, features, self._dets)

    def fuse(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        total: np.ndarray | float = 0.0
        for d in self._fused:
            total = total + (scores[d.name] - d.mean) / d.std
        return np.asarray(total / len(self._fused), dtype=np.float64)

    def score(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> np.ndarray:
        """Fused score per sample (float64); only the fused detectors run. Compare with ``threshold``.

        Hot path (batch 1 in the guard): one stacked matrix product per view.
        Anything unusual (missing view, wrong shape, NaN/Inf, which show up in
        ``|v|^2`` or the row sums) goes to the fully checked path, which raises
        the specific ``AnomalyInputError``.
        """
        plan = self._plan
        if plan is None:
            return self._checked_score(x, logits, features)
        raw = (x, logits, features)
        if plan.ones is not None:
            one = self._score_one(plan, raw)
            if one is not None:
                return one
        n = -1
        out = None
        for vi, width, matrix, members in plan.views:
            arr = raw[vi]
            if arr is None:
                return self._checked_score(x, logits, features)
            arr = np.asarray(arr, dtype=np.float64)
            if arr.ndim < 2:
                return self._checked_score(x, logits, features)
            arr = arr.reshape(arr.shape[0], -1)
            if out is None:
                n = arr.shape[0]
                out = np.empty((n, plan.k))
            if arr.shape[0] != n or (width is not None and arr.shape[1] != width):
                return self._checked_score(x, logits, features)
            if matrix is not None:
                vv = np.einsum("ij,ij->i", arr, arr)
                if not math.isfinite(float(np.add.reduce(vv))):
                    return self._checked_score(x, logits, features)
                prod = arr @ matrix
                for col, post, a, b in members:
                    out[:, col] = post(arr, prod[:, a:b], vv)
            else:
                if not math.isfinite(float(np.add.reduce(arr, axis=None))):
                    return self._checked_score(x, logits, features)
                for col, post, _a, _b in members:
                    out[:, col] = post(arr, arr, arr)
        if out is None:
            return self._checked_score(x, logits, features)
        res: np.ndarray = out @ plan.weights + plan.bias
        return res

    def _score_one(self, plan: _FusedPlan, raw: tuple[np.ndarray | None, ...]) -> np.ndarray | None:
        """Batch-1 fused score, or None when the request is not a clean batch of one
        (then the general path handles or refuses it)."""
        total = plan.bias
        wl = plan.wlist
        ones = plan.ones
        if ones is None:
            return None
        for vi, width, matrix, need_nrm, idx, members in ones:
            arr = raw[vi]
            if type(arr) is not np.ndarray or arr.ndim < 2 or arr.shape[0] != 1:
                return None
            if matrix is None:
                z = arr.ravel().tolist()
                if (width is not None and len(z) != width) or not math.isfinite(sum(z)):
                    return None
                for col, post, _a, _b, _m in members:
                    total += wl[col] * post(z, None, 0.0, 1.0, 0.0)
                continue
            d = matrix.shape[0] - (2 if need_nrm else 1)
            if arr.size != d:
                return None
            u = _concat((arr.reshape(-1), _TAIL2 if need_nrm else _TAIL1))  # float64 [v, 1(, 0)]
            v = u[:d]
            vv = float(v @ v)
            if not math.isfinite(vv):
                return None
            nrm = 1.0
            if need_nrm:
                nrm = max(math.sqrt(vv), 1e-12)
                u[d + 1] = nrm
            prod = u @ matrix
            mins = _reduceat(prod, idx).tolist() if idx is not None else ()
            for col, post, a, b, mpos in members:
                total += wl[col] * post(v, prod[a:b], vv, nrm, 0.0 if mpos is None else mins[mpos])
        return np.array([total])

    def _checked_score(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> np.ndarray:
        """Detector by detector with every input check (raises AnomalyInputError)."""
        return self.fuse(self._scores(x, logits, features, self._fused))

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        if type(scores) is not np.ndarray or scores.dtype != np.float64:
            scores = np.asarray(scores, dtype=np.float64)
        return scores > self.threshold

    @property
    def detector_thresholds(self) -> dict[str, float]:
        return {d.name: d.threshold for d in self._dets}

    @property
    def detector_names(self) -> list[str]:
        return [d.name for d in self._dets]
