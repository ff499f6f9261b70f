"""On-device anomaly gate: scoring, in numpy and onnxruntime, of detectors fitted by ``edgeward fit-ood``.

Reads ``detectors.npz`` (plain float arrays, never pickled) and
``detectors.json`` (kinds, normalisation, thresholds, fusion rule).

The scoring maths, in one place (``hardening.ood`` fits these parameters and any
differentiable copy of the gate mirrors these formulas):

* Sign convention: **higher score = more anomalous**, for every detector and for
  the fused score; an input is anomalous when its fused score is above
  ``threshold`` (+inf when the calibration split was too small for the chosen
  false-rejection rate: then nothing is rejected).
* The **input view** the input-space detectors read is a compact view of the raw input,
  fixed at fit time and recorded in ``detectors.json`` (``input_view``), so the gate's cost
  scales with the model, not with the input: ``flatten`` (the raw values, inputs of at most
  ``max_values``), ``avgpool`` (an NCHW image average-pooled to ``out`` = (h, w) over
  adaptive bins, rows ``floor(i*H/h) .. ceil((i+1)*H/h)``, torch's ``AdaptiveAvgPool2d``,
  as two small products ``rows @ x @ cols^T``), or ``projection``
  (``x @ matrix``, a fitted random projection of a flat input). Files of
  format ``edgeward-ood/1`` have no ``input_view``: ``flatten``.
* Detector scores ``s`` on one view ``v`` (a row; views: input, logits, features):

  - ``msp``:         ``1 - max_c softmax(v / T)_c``
  - ``energy``:      ``-T * logsumexp(v / T)``
  - ``mahalanobis``: ``min_c |v W - m_c|^2`` with ``W W^T = P``, the shared precision
    (full rank: exact; above the size budget: the leading ``r`` principal directions of the
    tied covariance) and ``m_c = mu_c W``; format /1's ``means``/``precision`` load as the
    exact factor of ``P``
  - ``knn`` / ``input_knn``: Euclidean distance to the k-th nearest bank row
    (``v`` scaled to unit norm first when ``normalize``, the ``knn`` default)
  - ``pca``:         ``|r|^2`` with ``r = (v - m) - ((v - m) W^T) W`` (reconstruction error;
    computed as ``|v - m|^2 - s H s^T``, ``s = (v - m) W^T``, ``H = 2I - W W^T``, split by sign)
* Normalisation per detector: ``z = (s - mean) / std`` (in-distribution statistics).
* Fusion over the ``members`` (``fusion.rule``):

  - ``mean_z``:     ``mean_i z_i`` (legacy; a detector that finds an input more typical
    than typical, z << 0, cancels the others)
  - ``mean_pos_z``: ``mean_i max(z_i, 0)`` (one-sided: a detector can only add evidence)
  - ``max_z``:      ``max_i z_i``

Every detector's maths is declared once, below, not coded per call path: column blocks of
its view's product (with constant offsets), the per-row *terms* its score is a linear
combination of (a block's minimum or k-th smallest entry, a block's squared norm, one
column, ``|v|^2``, logsumexp/max of the logits) and a post map (none, ``max(., 0)``,
``sqrt(max(., 0))``, ``1 - exp``). One program scores any set of detectors: per view one
float32 product with every block stacked and one offset addition, one reduction per block
kind into a term matrix ``T``, then ``post(T @ A + c)`` for all detectors at once and one
finiteness check on ``T`` (a NaN/Inf in a view makes its ``|v|^2`` and block reductions
NaN/Inf; the logits, whose softmax terms stay finite on a -inf, are checked themselves).
``_Program`` lays it out and ``gate_graph`` emits it as onnxruntime nodes built on the device
from these declarations, the compact input view included: ``GateGraph`` runs them alone
(audits, fitting: ``score``), and the guard appends them to the model's own graph
(``AnomalyScorer.extension``), so a request is one ``InferenceSession.run`` for model and
gate (BENCHMARKS.md "The gate inside the model's session").
The fused score folds the z-normalisation into one product (``mean_z``, ``mean_pos_z``:
``max(z, 0) = (max(s, mean) - mean) / std``). ``Detector.raw`` runs the same program for
one detector; the guard, the audits, ``hardening.ood``'s fitted detectors
(``score_samples``) and the tests all score through it. Products are float32, the term
matrix and the fusion float64: scores agree across batch sizes to float32 rounding. The
per-request work (``AnomalyScorer.work``, multiply-adds) is fixed at fit time by
``hardening.ood.budget.GateBudget`` and recorded in ``detectors.json`` (``budget``).
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
from .gate_graph import Fusion, GateGraph, ViewGraph, gate_extension

FORMAT = "edgeward-ood/2"
FORMATS = ("edgeward-ood/1", FORMAT)  # /1: no input_view (flatten), float64 arrays, Mahalanobis as precision
VIEWS = ("input", "logits", "features")
NPZ_NAME, JSON_NAME = "detectors.npz", "detectors.json"
FUSION_RULES = ("mean_z", "mean_pos_z", "max_z")
INPUT_VIEWS = ("flatten", "avgpool", "projection")

__all__ = ["AnomalyScorer", "AnomalyFormatError", "AnomalyInputError", "FORMAT", "FORMATS", "FUSION_RULES",
           "Detector", "InputView", "build_detector", "fuse_z", "non_finite"]

_F32 = np.float32


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
class InputView:
    """The compact view of the raw input that input-space detectors read (module docstring)."""

    kind: str = "flatten"
    shape: tuple[int, ...] | None = None  # per-sample raw shape it was fitted for (None: any)
    out: tuple[int, int] | None = None  # avgpool: (h, w)
    matrix: np.ndarray | None = field(default=None, repr=False)  # projection: (D, m)

    def __post_init__(self) -> None:
        if self.matrix is not None:
            self.matrix = np.ascontiguousarray(self.matrix, _F32)
        self.size = None if self.shape is None else math.prod(self.shape)
        self._graph: ViewGraph | None = None

    @property
    def macs(self) -> int:
        """Multiply-adds per sample of ``apply`` (0 for ``flatten``)."""
        if self.kind == "avgpool":
            assert self.shape is not None and self.out is not None
            c, h, w = self.shape
            oh, ow = self.out
            return c * h * w * ow + c * oh * h * ow  # rows @ x @ cols^T
        if self.kind == "projection":
            assert self.matrix is not None
            return int(self.matrix.size)
        return 0

    @property
    def width(self) -> int | None:
        if self.kind == "avgpool":
            assert self.shape is not None and self.out is not None
            return self.shape[0] * self.out[0] * self.out[1]
        if self.kind == "projection":
            assert self.matrix is not None
            return int(self.matrix.shape[1])
        return self.size

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Raw inputs ``x`` (n, ...) as the float32 array the view's nodes read (``dims``); raises
        ``AnomalyInputError`` when the per-sample size is not the fitted one."""
        n = len(x)
        if self.size is not None and x.size != n * self.size:
            self.check_size(x.size // max(n, 1))
        dims = tuple(self.shape or ()) if self.kind == "avgpool" else (-1,)
        return x.reshape(n, *dims).astype(_F32, copy=False)

    @property
    def dims(self) -> list[Any]:
        """Per-sample dims of ``raw``'s arrays: (C, H, W) for ``avgpool``, else (values,)."""
        if self.kind == "avgpool":
            return list(self.shape or ())
        return [self.size or "d"]

    def check_size(self, size: int) -> None:
        """Refuse raw inputs of ``size`` values per sample when the view was fitted on another size."""
        if self.size is not None and size != self.size:
            raise AnomalyInputError(f"input has {size} values per sample, the detectors "
                                    f"were fitted on {self.size} ({'x'.join(map(str, self.shape or ()))})")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, width) float32 view of raw inputs ``x`` (n, ...), computed by the same nodes the
        gate runs (``gate_graph.ViewGraph``)."""
        if self._graph is None:
            self._graph = ViewGraph(self)
        return self._graph(self.raw(np.asarray(x)))

    def to_meta(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(``input_view`` entry of ``detectors.json``, its npz arrays)."""
        d: dict[str, Any] = {"kind": self.kind, "shape": None if self.shape is None else list(self.shape)}
        arrays = {}
        if self.kind == "avgpool":
            d["out"] = list(self.out or ())
        if self.kind == "projection":
            assert self.matrix is not None
            arrays["input_view__matrix"] = np.asarray(self.matrix, _F32)
        d["width"] = self.width
        return d, arrays

    @classmethod
    def from_meta(cls, spec: object, arrays: dict[str, np.ndarray]) -> InputView:
        if spec is None:
            return cls()
        try:
            assert isinstance(spec, dict)
            kind = spec["kind"]
            shape = None if spec.get("shape") is None else tuple(int(v) for v in spec["shape"])
            if kind not in INPUT_VIEWS or (shape is not None and (not shape or min(shape) < 1)):
                raise ValueError(f"kind {kind!r}, shape {shape}")
            if kind == "avgpool":
                out = tuple(int(v) for v in spec["out"])
                if shape is None or len(shape) != 3 or len(out) != 2 or not (1 <= out[0] <= shape[1] and 1 <= out[1] <= shape[2]):
                    raise ValueError(f"avgpool needs a (C, H, W) shape and 1 <= out <= (H, W), got {shape} -> {out}")
                return cls("avgpool", shape, (out[0], out[1]))
            if kind == "projection":
                m = _need(arrays, "input_view", "matrix", 2)
                if shape is None or m.shape[0] != math.prod(shape):
                    raise ValueError(f"projection matrix {m.shape} does not fit shape {shape}")
                return cls("projection", shape, matrix=m)
            return cls("flatten", shape)
        except (AssertionError, KeyError, TypeError, ValueError) as e:
            raise AnomalyFormatError(f"malformed input_view ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Term:
    """One per-row quantity of a view that detector scores are linear combinations of.

    ``min``/``kth``: the smallest / k-th smallest entry of a block of the view's product
    (``scaled``: times ``1/max(|v|, 1e-12)``, a positive per-row factor that commutes with
    the selection); ``sumsq``: a block's squared row norm; ``col``: a one-column block;
    ``sq``: ``|v|^2``; ``usq``: ``|v / max(|v|, 1e-12)|^2``; ``lse``/``max``: logsumexp /
    max of ``v / temperature`` (logits)."""

    kind: str
    coef: float = 1.0
    block: int = -1  # index into the detector's blocks (min, kth, sumsq, col)
    k: int = 1
    scaled: bool = False
    temperature: float = 1.0


POSTS = ("none", "relu", "sqrt_relu", "one_minus_exp")  # applied to sum(coef * term) + const


@dataclass
class Detector:
    """One exported detector: its view, normalisation and threshold. Its maths is declared,
    not coded: column ``blocks`` of the view's product (with offsets), the ``terms`` its score
    is a linear combination of, a constant and a ``post`` map (module docstring), so every
    detector of every view is finished by the same few vectorised operations (``_Program``)."""

    kinds: ClassVar[tuple[str, ...]] = ()
    name: str
    view: str
    mean: float
    std: float
    threshold: float
    width: int | None = None  # values per sample of the view (None = any)

    def blocks(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """(width, k) float32 column blocks of the view's product, each with (k,) offsets or None."""
        return []

    def terms(self) -> tuple[list[Term], float, str]:
        """(terms, constant, post): score = post(sum(t.coef * t) + constant)."""
        raise NotImplementedError

    def raw(self, v: np.ndarray) -> np.ndarray:
        """Score per row of ``v`` (n, width), float64; higher = more anomalous."""
        prog = self.__dict__.get("_program")
        if prog is None:
            prog = self.__dict__["_program"] = _Program([self])
        return prog.run({self.view: np.asarray(v).astype(_F32, copy=False)})[:, 0]


@dataclass
class Softmax(Detector):
    """``msp`` and ``energy`` on logits."""

    kinds = ("msp", "energy")
    kind: str = "msp"
    temperature: float = 1.0

    def terms(self) -> tuple[list[Term], float, str]:
        t = self.temperature
        if self.kind == "msp":  # the top class's probability is exp(max - logsumexp)
            return [Term("max", 1.0, temperature=t), Term("lse", -1.0, temperature=t)], 0.0, "one_minus_exp"
        return [Term("lse", -t, temperature=t)], 0.0, "none"


@dataclass
class Mahalanobis(Detector):
    kinds = ("mahalanobis",)
    factor: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)  # W (D, r)
    centers: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)  # m = mu W (C, r)

    def blocks(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        # |s - m_c|^2 = |s|^2 + (-2 s.m_c + |m_c|^2) with s = v W
        w = self.factor.astype(_F32)
        cross = (-2.0 * (w.astype(np.float64) @ self.centers.T)).astype(_F32)
        return [(w, None), (cross, (self.centers * self.centers).sum(axis=1).astype(_F32))]

    def terms(self) -> tuple[list[Term], float, str]:
        return [Term("sumsq", block=0), Term("min", block=1)], 0.0, "none"


@dataclass
class Knn(Detector):
    kinds = ("knn", "input_knn")
    bank: np.ndarray = field(default_factory=lambda: np.zeros((1, 0)), repr=False)
    n_neighbors: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.normalize:  # the bank is stored unit-norm; renormalised here so |b|^2 = 1 exactly
            b = self.bank.astype(np.float64)
            self.bank = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)

    def blocks(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        # |u - b|^2 = |u|^2 - 2 u.b + |b|^2; normalising scales a row by 1/|v| after the selection
        b = self.bank.astype(np.float64)
        off = None if self.normalize else np.einsum("ij,ij->i", b, b).astype(_F32)
        return [((-2.0 * b.T).astype(_F32), off)]

    def terms(self) -> tuple[list[Term], float, str]:
        kind = "min" if self.n_neighbors == 1 else "kth"
        near = Term(kind, block=0, k=self.n_neighbors, scaled=self.normalize)
        if self.normalize:  # u = v / max(|v|, 1e-12), |b| = 1
            return [Term("usq"), near], 1.0, "sqrt_relu"
        return [Term("sq"), near], 0.0, "sqrt_relu"


@dataclass
class Pca(Detector):
    kinds = ("pca",)
    center: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    components: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)

    def _parts(self) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], list[Term]]:
        # c = v - m, s = c W^T: |r|^2 = |c|^2 - 2|s|^2 + s G s^T = |c|^2 - s H s^T, H = 2I - W W^T.
        # H = A A^T - B B^T (its eigenvalues split by sign; A = I for orthonormal rows, as PCA
        # gives), so |r|^2 = |v|^2 + (-2 v.m + |m|^2) - |s A|^2 + |s B|^2: no second product
        w = self.components.astype(_F32).astype(np.float64)
        m = self.center.astype(_F32).astype(np.float64)
        e, q = np.linalg.eigh(2.0 * np.eye(len(w)) - w @ w.T)
        pos = e > 0
        a, b = q[:, pos] * np.sqrt(e[pos]), q[:, ~pos] * np.sqrt(-e[~pos])
        if not b.size and np.allclose(a @ a.T, np.eye(len(w)), atol=1e-6):
            a = np.eye(len(w))  # orthonormal rows: s itself
        blocks: list[tuple[np.ndarray, np.ndarray | None]] = [((-2.0 * m[:, None]).astype(_F32), np.array([m @ m], _F32))]
        terms = [Term("sq"), Term("col", block=0)]
        for sign, f in ((-1.0, a), (1.0, b)):
            if f.shape[1]:
                blocks.append(((w.T @ f).astype(_F32), (-(m @ w.T @ f)).astype(_F32)))
                terms.append(Term("sumsq", sign, block=len(blocks) - 1))
        return blocks, terms

    def blocks(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return self._parts()[0]

    def terms(self) -> tuple[list[Term], float, str]:
        return self._parts()[1], 0.0, "relu"


def _precision_factor(precision: np.ndarray) -> np.ndarray:
    """W with W W^T = P (format /1 files ship the precision itself)."""
    e, q = np.linalg.eigh((precision + precision.T) / 2.0)
    w: np.ndarray = q * np.sqrt(np.maximum(e, 0.0))
    return w


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
        if f"{name}__precision" not in arrays:
            factor, centers = _need(arrays, name, "factor", 2), _need(arrays, name, "centers", 2)
            if centers.shape[1] != factor.shape[1]:
                raise AnomalyFormatError(f"detector '{name}': centers {centers.shape} do not fit factor {factor.shape}")
        else:  # format /1: the precision itself
            means, prec = _need(arrays, name, "means", 2), _need(arrays, name, "precision", 2)
            if prec.shape != (means.shape[1], means.shape[1]):
                raise AnomalyFormatError(f"detector '{name}': precision shape {prec.shape} does not fit means {means.shape}")
            factor = _precision_factor(prec)
            centers = means @ factor
        det = Mahalanobis(**base, width=factor.shape[0], factor=factor, centers=centers)
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


class _ViewPlan:
    """One view's part of a ``_Program``: every block of its detectors stacked into one float32
    product (ordered by the reduction that reads it) plus one offset vector, and the columns of
    the term matrix its reductions write."""

    def __init__(self, view: str, dets: list[tuple[int, Detector]], t0: int) -> None:
        self.view = view
        self.dets = [d for _, d in dets]
        self.width = next((d.width for d in self.dets if d.width is not None), None)  # one per view (load checks)
        self.check = view == "logits"  # softmax terms can stay finite on a -inf logit: the view is checked itself
        groups: dict[str, list[tuple[int, Term, tuple[np.ndarray, np.ndarray | None]]]] = {
            "min_scaled": [], "min": [], "kth": [], "sumsq": [], "col": []}
        shared: list[tuple[int, Term]] = []
        for i, d in dets:
            ts, _, _ = d.terms()
            blocks = d.blocks()
            for t in ts:
                if t.kind in ("min", "kth", "sumsq", "col"):
                    groups["min_scaled" if t.kind == "min" and t.scaled else t.kind].append((i, t, blocks[t.block]))
                else:
                    shared.append((i, t))
        mats, offs, at = [], [], 0
        self.coefs: list[tuple[int, int, float]] = []  # (term column, detector index, coefficient)
        col = t0
        spans: dict[str, tuple[int, int, list[int]]] = {}  # group -> (first product column, last, starts)
        self.kth: list[tuple[slice, int, int, bool]] = []
        for g, items in groups.items():
            starts, first = [], at
            for i, t, (m, o) in items:
                if not m.shape[1]:
                    raise AnomalyFormatError(f"detector '{self.dets[0].name}': an empty block of columns")
                starts.append(at - first)
                mats.append(m)
                offs.append(np.zeros(m.shape[1], _F32) if o is None else o)
                if g == "kth":
                    self.kth.append((slice(at, at + m.shape[1]), t.k, col, t.scaled))
                at += m.shape[1]
                self.coefs.append((col, i, t.coef))
                col += 1
            spans[g] = (first, at, starts)
        self.matrix = np.ascontiguousarray(np.concatenate(mats, axis=1), _F32) if mats else None
        off = np.concatenate(offs).astype(_F32) if offs else np.zeros(0, _F32)
        self.offsets = off if off.any() else None
        # term columns: [min_scaled | min | kth | sumsq | col] then the shared ones
        n_ms, n_m = len(groups["min_scaled"]), len(groups["min"])
        self.t_min = slice(t0, t0 + n_ms + n_m)
        self.t_min_scaled = slice(t0, t0 + n_ms)
        self.p_min = slice(0, spans["min"][1])
        self.min_starts = np.array(spans["min_scaled"][2] + [s + spans["min"][0] for s in spans["min"][2]], np.intp)
        ss0, ss1, ss_starts = spans["sumsq"]
        t_ss0 = t0 + n_ms + n_m + len(groups["kth"])
        self.t_ss = slice(t_ss0, t_ss0 + len(ss_starts))
        self.p_ss = slice(ss0, ss1)
        self.ss_starts = np.array(ss_starts, np.intp)
        c0, c1, _ = spans["col"]
        self.t_col, self.p_col = slice(self.t_ss.stop, self.t_ss.stop + c1 - c0), slice(c0, c1)
        # shared terms: one column each per distinct (kind, temperature)
        self.sq_col = self.usq_col = None
        self.logit_cols: dict[float, list[int | None]] = {}  # temperature -> [lse column, max column]
        for i, t in shared:
            if t.kind == "sq":
                if self.sq_col is None:
                    self.sq_col, col = col, col + 1
                tc = self.sq_col
            elif t.kind == "usq":
                if self.usq_col is None:
                    self.usq_col, col = col, col + 1
                tc = self.usq_col
            elif t.kind in ("lse", "max"):
                slot = self.logit_cols.setdefault(t.temperature, [None, None])
                j = 0 if t.kind == "lse" else 1
                if slot[j] is None:
                    slot[j], col = col, col + 1
                tc = slot[j]  # type: ignore[assignment]
            else:
                raise AnomalyFormatError(f"unknown term {t.kind!r}")
            self.coefs.append((tc, i, t.coef))
        self.scaled = bool(n_ms or self.usq_col is not None or any(k[3] for k in self.kth))
        self.t_end = col

    @property
    def macs(self) -> int:
        """Multiply-adds per sample of the view's product."""
        return 0 if self.matrix is None else int(self.matrix.size)


class _Program:
    """Raw scores of ``dets``: per view one product and a few reductions into one term matrix
    ``T`` (n, terms), then ``post(T @ A + c)`` for every detector at once (``Detector.terms``),
    or with ``fusion`` the fused score. Laid out here, run as one onnxruntime graph
    (``gate_graph.GateGraph``), the one scoring path."""

    def __init__(self, dets: list[Detector], fusion: Fusion | None = None, input_view: InputView | None = None) -> None:
        self.dets = dets
        self.fusion = fusion
        self.input_view = input_view or InputView()
        self._graph: GateGraph | None = None
        self.plans: list[_ViewPlan] = []
        at = 0
        for view in dict.fromkeys(d.view for d in dets):
            plan = _ViewPlan(view, [(i, d) for i, d in enumerate(dets) if d.view == view], at)
            self.plans.append(plan)
            at = plan.t_end
        self.n_terms = at
        self.views = tuple(p.view for p in self.plans)
        self.a = np.zeros((at, len(dets)))
        for plan in self.plans:
            for c, i, coef in plan.coefs:
                self.a[c, i] += coef
        consts, posts = zip(*((d.terms()[1], d.terms()[2]) for d in dets))
        if not set(posts) <= set(POSTS):
            raise AnomalyFormatError(f"unknown post map in {posts}")
        self.c = np.array(consts) if any(consts) else None
        p = np.array(posts)
        self.lo = np.where(np.isin(p, ("relu", "sqrt_relu")), 0.0, -np.inf)
        self.relu = bool(np.isfinite(self.lo).any())
        self.sqrt_mask, self.exp_mask = p == "sqrt_relu", p == "one_minus_exp"
        self.sqrt, self.exp = bool(self.sqrt_mask.any()), bool(self.exp_mask.any())

    def check_widths(self, sizes: dict[str, int | None]) -> None:
        """Refuse (``AnomalyInputError``) views of ``sizes`` values per sample (raw input; None:
        unknown) that do not fit: the input against ``input_view``, each view against its detectors."""
        for plan in self.plans:
            got = sizes.get(plan.view)
            if got is None:
                continue
            if plan.view == "input":
                self.input_view.check_size(got)
                got = self.input_view.width or got
            if plan.width is not None and got != plan.width:
                who = next(d.name for d in plan.dets if d.width is not None)
                raise AnomalyInputError(f"detector '{who}': {plan.view} has {got} values per sample, expected {plan.width}")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """(n, len(dets)) float64 raw scores, or (n,) fused with ``fusion``; ``feeds`` as
        ``AnomalyScorer._views`` gives them (float32; the input raw, (n, ...))."""
        self.check_widths({v: a[0].size if len(a) else None for v, a in feeds.items()})
        if self._graph is None:
            self._graph = GateGraph(self, self.fusion)
        scores, check = self._graph.score(feeds)
        if not math.isfinite(check):
            raise non_finite(feeds)
        return scores


def non_finite(feeds: dict[str, np.ndarray] | None = None) -> AnomalyInputError:
    """The refusal of a non-finite check: a NaN/Inf in a view makes the term matrix NaN/Inf
    (|v|^2, every block reduction), so one check covers all; named by view when known."""
    with np.errstate(over="ignore", invalid="ignore"):
        bad = next((v for v, a in (feeds or {}).items() if not np.isfinite(np.square(a)).all()), None)
    if bad is None:
        return AnomalyInputError("the gate's views hold NaN/Inf values (or values whose squares overflow float32)")
    return AnomalyInputError(f"{bad} holds NaN/Inf values (or values whose squares overflow float32)")


class AnomalyScorer:
    """Fused anomaly score of the exported detectors (formulas: module docstring)."""

    def __init__(self, npz_bytes: bytes, meta: dict[str, Any], dets: list[Detector], rule: str,
                 members: list[str], input_view: InputView | None = None) -> None:
        self.npz_bytes = npz_bytes
        self.meta = meta
        self.detectors = dets
        self.rule = rule
        self.input_view = input_view or InputView()
        self._fused = [d for d in dets if d.name in members]
        self.threshold: float = _threshold(meta.get("threshold"), "threshold")
        alpha = meta.get("alpha")
        self.alpha: float = float(alpha) if isinstance(alpha, (int, float)) else float("nan")
        self.needs: frozenset[str] = frozenset(d.view for d in dets)
        self._all = _Program(dets, None, self.input_view)
        # fuse_z on z = (s - mean) / std, folded into one product (mean rules) or one affine map (max)
        mean = np.array([d.mean for d in self._fused])
        inv_std = np.array([1.0 / d.std for d in self._fused])
        weights = inv_std / len(self._fused)
        self._program = _Program(self._fused, Fusion(rule, mean, weights, inv_std, float(mean @ weights)), self.input_view)

    # ---- loading -------------------------------------------------------
    @classmethod
    def from_bytes(cls, npz_bytes: bytes, meta: dict[str, Any]) -> AnomalyScorer:
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            raise AnomalyFormatError(f"detector meta must be a dict with format {FORMAT!r} "
                                     f"(or the older {', '.join(repr(f) for f in FORMATS[:-1])})")
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
        view = InputView.from_meta(meta.get("input_view"), arrays)
        for v in VIEWS:
            widths = {d.width for d in dets if d.view == v and d.width is not None}
            if len(widths) > 1:
                raise AnomalyFormatError(f"detectors of the {v!r} view disagree on its width")
            if v == "input" and widths and view.width is not None and widths != {view.width}:
                raise AnomalyFormatError(f"input detectors read {widths.pop()} values, the input_view gives {view.width}")
        return cls(npz_bytes, meta, dets, str(rule), members, view)

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
               needed: tuple[str, ...]) -> dict[str, np.ndarray]:
        raw = {"input": x, "logits": logits, "features": features}
        out: dict[str, np.ndarray] = {}
        n = None
        for view in needed:
            arr = raw[view]
            if arr is None:
                who = next((d.name for d in self.detectors if d.view == view), view)
                raise AnomalyInputError(f"detector '{who}' needs the {view!r} array")
            if type(arr) is not np.ndarray:
                arr = np.asarray(arr)
            if arr.ndim < 2:
                raise AnomalyInputError(f"{view} must be batched (n, ...), got shape {arr.shape}")
            if arr.dtype.kind not in "fiub":
                raise AnomalyInputError(f"{view} must hold numbers, got dtype {arr.dtype}")
            if n is not None and len(arr) != n:
                raise AnomalyInputError(f"{view} has {len(arr)} samples, other arrays have {n}")
            n = len(arr)
            out[view] = self.input_view.raw(arr) if view == "input" else arr.reshape(n, -1).astype(_F32, copy=False)
        return out

    def view_arrays(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None,
                    needed: tuple[str, ...] = VIEWS) -> dict[str, np.ndarray]:
        """Each needed view once, as the detectors read it: (n, width) float32 (the input
        through ``input_view``), finite, same n everywhere."""
        views = self._views(x, logits, features, needed)
        if "input" in views:
            views["input"] = self.input_view.apply(views["input"])
        for a in views.values():
            # average pooling and projections keep a NaN/Inf (every raw value has a positive
            # weight, and inf * 0 is NaN), and so does a sum (a float32 overflow is refused too)
            if not math.isfinite(a.sum()):
                raise non_finite(views)
        return views

    def _run(self, prog: _Program, x: np.ndarray | None, logits: np.ndarray | None,
             features: np.ndarray | None) -> np.ndarray:
        return prog.run(self._views(x, logits, features, prog.views))

    def scores_by_detector(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> dict[str, np.ndarray]:
        """Raw score of every detector (float64, one per sample); ``x`` is the raw model input."""
        s = self._run(self._all, x, logits, features)
        return {d.name: s[:, i] for i, d in enumerate(self.detectors)}

    def fuse(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """Fused score from raw per-detector scores (only the members are used)."""
        z = np.stack([(np.asarray(scores[d.name], np.float64) - d.mean) / d.std for d in self._fused], axis=1)
        return fuse_z(z, self.rule)

    def score(self, x: np.ndarray | None, logits: np.ndarray | None, features: np.ndarray | None) -> np.ndarray:
        """Fused score per sample (float64); only the fused detectors run. Compare with ``threshold``.
        ``x`` is the raw model input. Raises ``AnomalyInputError`` when the arrays do not fit or
        hold NaN/Inf (numpy may warn about the invalid values it met before the refusal)."""
        return self._run(self._program, x, logits, features)

    def check_widths(self, sizes: dict[str, int | None]) -> None:
        """``_Program.check_widths`` for the fused score's views."""
        self._program.check_widths(sizes)

    def extension(self, model: Any, tensors: dict[str, str]) -> bytes:
        """The fused score as a part appended to the user's ``model`` (an ``onnx.ModelProto``,
        weights optional), reading each view from the model tensor ``tensors[view]``: the
        guard's one session then runs model and gate together (``gate_graph.gate_extension``;
        outputs ``gate_graph.GATE_OUTPUTS``)."""
        return gate_extension(self._program, self._program.fusion, model, tensors)

    @property
    def work(self) -> dict[str, int]:
        """Per-sample cost of ``score`` in multiply-adds: the input view, each view's product."""
        view = self.input_view.macs if any(p.view == "input" for p in self._program.plans) else 0
        products = {p.view: p.macs for p in self._program.plans if p.macs}
        return {"input_view": view, **{f"{v}_product": m for v, m in products.items()},
                "total": view + sum(products.values())}

    def is_anomalous(self, scores: np.ndarray) -> np.ndarray:
        res: np.ndarray = np.asarray(scores, dtype=np.float64) > self.threshold
        return res

    @property
    def detector_thresholds(self) -> dict[str, float]:
        return {d.name: d.threshold for d in self.detectors}

    @property
    def detector_names(self) -> list[str]:
        return [d.name for d in self.detectors]
