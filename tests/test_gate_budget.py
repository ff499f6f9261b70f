"""The gate's per-request work: budgeted at fit time, recorded, and computed by one program.

* Each detector kind's runtime score equals its formula (``runtime_guard.anomaly``'s
  docstring) written out independently in numpy, including the cases the folded
  formulation must get right: non-orthonormal PCA rows, k > 1, an all-zero feature vector
  for the normalised kNN, a temperature.
* The fused score equals ``fuse_z`` on the per-detector z-scores under every rule.
* A NaN/Inf (or float32-overflowing value) in any view is refused for every kind, although
  only the term matrix is checked.
* ``fit_ood`` keeps every exported matrix and the input view within ``GateBudget``, records
  the budget and the per-request multiply-adds, and on the digits demo the default budget
  cuts nothing (same arrays as the previous release's budget). Files without a budget entry
  (the previous /2 writer) still load and score the same.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from hardening.data import load_dataset
from hardening.ood import GateBudget, fit_ood
from hardening.ood.budget import PREVIOUS
from runtime_guard.anomaly import FORMAT, FUSION_RULES, AnomalyInputError, AnomalyScorer, InputView, fuse_z

D_IN, D_F, C = 18, 12, 4


def _data(seed: int, n: int = 25):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 2, 3, 3)).astype(np.float32), (rng.standard_normal((n, C)) * 3).astype(np.float32),
            rng.standard_normal((n, D_F)).astype(np.float32))


def _scorer(seed: int, k: int = 1, pca_scale: float = 1.0, rule: str = "mean_pos_z") -> tuple[AnomalyScorer, dict]:
    rng = np.random.default_rng(seed)
    fac = rng.standard_normal((D_F, 7))
    comp = np.linalg.qr(rng.standard_normal((D_IN, 5)))[0].T * pca_scale
    comp[0] *= 1.3  # one row off unit length: H has both signs when pca_scale != 1
    bank = rng.standard_normal((30, D_F))
    arrays = {
        "maha__factor": fac, "maha__centers": rng.standard_normal((C, 7)),
        "knn__bank": bank / np.linalg.norm(bank, axis=1, keepdims=True),
        "iknn__bank": rng.random((20, D_IN)),
        "pca__mean": rng.random(D_IN), "pca__components": comp,
    }
    buf = io.BytesIO()
    np.savez(buf, **{a: v.astype(np.float32) for a, v in arrays.items()})
    norms = [{"mean": 0.2 * i, "std": 0.5 + i} for i in range(6)]
    dets = [
        {"name": "energy", "kind": "energy", "view": "logits", "params": {"temperature": 1.5}, "norm": norms[0]},
        {"name": "msp", "kind": "msp", "view": "logits", "params": {"temperature": 0.7}, "norm": norms[1]},
        {"name": "maha", "kind": "mahalanobis", "view": "features", "norm": norms[2]},
        {"name": "knn", "kind": "knn", "view": "features", "params": {"n_neighbors": k, "normalize": True}, "norm": norms[3]},
        {"name": "iknn", "kind": "input_knn", "view": "input", "params": {"n_neighbors": k}, "norm": norms[4]},
        {"name": "pca", "kind": "pca", "view": "input", "norm": norms[5]},
    ]
    meta = {"format": FORMAT, "threshold": 1.0, "fusion": {"rule": rule, "members": [d["name"] for d in dets]},
            "detectors": dets}
    return AnomalyScorer.from_bytes(buf.getvalue(), meta), {a: v.astype(np.float32).astype(np.float64) for a, v in arrays.items()}


def _reference(a: dict, x: np.ndarray, lg: np.ndarray, ft: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The module docstring's formulas, written out directly (float64)."""
    v, lg, ft = x.reshape(len(x), -1).astype(np.float64), lg.astype(np.float64), ft.astype(np.float64)

    def lse(z):
        return np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)

    def kth(d2):
        return np.sort(d2, axis=1)[:, k - 1]

    s = ft @ a["maha__factor"]
    u = ft / np.maximum(np.linalg.norm(ft, axis=1, keepdims=True), 1e-12)
    c = v - a["pca__mean"]
    w = a["pca__components"]
    r = c - (c @ w.T) @ w
    return {
        "energy": -1.5 * lse(lg / 1.5),
        "msp": 1.0 - np.exp((lg / 0.7).max(1) - lse(lg / 0.7)),
        "maha": ((s[:, None, :] - a["maha__centers"][None]) ** 2).sum(2).min(1),
        "knn": np.sqrt(kth(((u[:, None, :] - a["knn__bank"][None]) ** 2).sum(2))),
        "iknn": np.sqrt(kth(((v[:, None, :] - a["iknn__bank"][None]) ** 2).sum(2))),
        "pca": (r * r).sum(1),
    }


@pytest.mark.parametrize("k,pca_scale", [(1, 1.0), (3, 1.0), (1, 1.6), (2, 0.5)])
def test_every_kind_equals_its_formula(k, pca_scale):
    sc, arrays = _scorer(0, k, pca_scale)
    x, lg, ft = _data(1)
    ft[0] = 0.0  # the normalised kNN of a zero vector: u = 0, distance 1 to every unit bank row
    got, ref = sc.scores_by_detector(x, lg, ft), _reference(arrays, x, lg, ft, k)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-4, atol=2e-4, err_msg=name)
    assert got["knn"][0] == pytest.approx(1.0, abs=1e-6)
    for d in sc.detectors:  # one detector alone (what hardening's score_samples calls) is the same program
        view = {"input": x, "logits": lg, "features": ft}[d.view].reshape(len(x), -1)
        np.testing.assert_allclose(d.raw(view), got[d.name], rtol=1e-6, atol=1e-6, err_msg=d.name)


@pytest.mark.parametrize("rule", FUSION_RULES)
def test_fused_score_is_fuse_z_of_the_detectors(rule):
    sc, _ = _scorer(2, rule=rule)
    x, lg, ft = _data(3, 40)
    by = sc.scores_by_detector(x, lg, ft)
    z = np.stack([(by[d.name] - d.mean) / d.std for d in sc.detectors], axis=1)
    np.testing.assert_allclose(sc.score(x, lg, ft), fuse_z(z, rule), rtol=1e-9, atol=1e-9)
    one = np.concatenate([sc.score(x[i : i + 1], lg[i : i + 1], ft[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(one, fuse_z(z, rule), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy meets the invalid values before the refusal
@pytest.mark.parametrize("view", ["input", "logits", "features"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_non_finite_values_in_any_view_are_refused_for_every_kind(view, bad):
    for members in (["energy"], ["msp"], ["maha"], ["knn"], ["iknn"], ["pca"]):
        sc, _ = _scorer(4)
        x, lg, ft = _data(5, 3)
        arrs = {"input": x, "logits": lg, "features": ft}
        reads = {"energy": "logits", "msp": "logits", "maha": "features", "knn": "features", "iknn": "input", "pca": "input"}
        if reads[members[0]] != view:
            continue
        if bad == 3e38 and view == "logits":
            continue  # a finite logit is a valid logit (the softmax terms are stable)
        arrs[view].reshape(3, -1)[1, 2] = bad
        sc = AnomalyScorer.from_bytes(sc.npz_bytes, {**sc.meta, "fusion": {"rule": "mean_pos_z", "members": members}})
        with pytest.raises(AnomalyInputError, match="NaN/Inf"):
            sc.score(arrs["input"], arrs["logits"], arrs["features"])
        with pytest.raises(AnomalyInputError, match="NaN/Inf"):
            sc.scores_by_detector(arrs["input"], arrs["logits"], arrs["features"])


@pytest.mark.parametrize("shape,out", [((3, 96, 96), (8, 8)), ((3, 32, 32), (8, 8)), ((1, 28, 28), (14, 14))])
def test_equal_bin_pooling_is_adaptive_avg_pool(shape, out):
    x = np.random.default_rng(0).random((4, *shape)).astype(np.float32)
    view = InputView("avgpool", shape, out)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), out).reshape(4, -1).numpy()
    np.testing.assert_allclose(view.apply(x), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(view.apply(np.asfortranarray(x)), ref, rtol=1e-5, atol=1e-6)  # any memory layout
    np.testing.assert_allclose(view.apply(x.astype(np.float64)), ref, rtol=1e-5, atol=1e-6)


def test_fit_respects_and_records_the_budget(digits_demo, tmp_path):
    budget = GateBudget(input_values=16, matrix_values=2**11)
    fit_ood(digits_demo.model_path, digits_demo.data_path, tmp_path / "small", budget=budget)
    sc = AnomalyScorer.load(tmp_path / "small")
    assert sc.input_view.width <= 16 and sc.input_view.out == (4, 4)  # 8x8 pools by 2: equal bins
    for d in sc.detectors:  # what the device multiplies per request, per detector
        assert sum(m.size for m, _ in d.blocks()) <= 2**11, d.name
    rec = sc.meta["budget"]
    assert (rec["input_values"], rec["matrix_values"]) == (16, 2**11)
    assert rec["macs_per_request"] == sc.work and sc.work["total"] == sum(v for k, v in sc.work.items() if k != "total")
    assert sc.work["total"] <= sc.input_view.macs + 4 * 2**11  # four detectors with a product
    assert sc.work["input_view"] == sc.input_view.macs == 8 * 8 * 4 + 4 * 8 * 4  # rows @ x @ cols^T


def test_default_budget_cuts_nothing_on_the_demo_and_old_files_load(digits_demo, tmp_path):
    fit_ood(digits_demo.model_path, digits_demo.data_path, tmp_path / "new")
    fit_ood(digits_demo.model_path, digits_demo.data_path, tmp_path / "old", budget=PREVIOUS)
    new, old = AnomalyScorer.load(tmp_path / "new"), AnomalyScorer.load(tmp_path / "old")
    with np.load(io.BytesIO(new.npz_bytes)) as a, np.load(io.BytesIO(old.npz_bytes)) as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert new.meta["input_view"] == old.meta["input_view"] and new.work == old.work
    # the previous /2 writer had no budget entry: still loads, scores the same, reports its work
    meta = {k: v for k, v in json.loads(json.dumps(new.meta)).items() if k != "budget"}
    legacy = AnomalyScorer.from_bytes(new.npz_bytes, meta)
    ds = load_dataset(digits_demo.data_path)
    from hardening.ood.pipeline import prepare_model

    v = prepare_model(digits_demo.model_path, ds).outputs(ds.x[:50])
    np.testing.assert_array_equal(legacy.score(v.input, v.logits, v.features), new.score(v.input, v.logits, v.features))
    assert legacy.work == new.work
