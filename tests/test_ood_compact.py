"""The gate's cost scales with the model: compact input view, bounded banks, one scoring path.

The input view is chosen at fit time, recorded in the detector file and applied by the
same code on the device; the torch gate copy follows it; older files still load.
"""

from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from attacks.gate_torch import GuardedTorch, TorchGate, _InputView, check_copy
from hardening.data import load_dataset
from hardening.ood import export_detectors
from hardening.ood.detectors import InputKNNDetector, KNNDetector, MahalanobisDetector, PCAReconstructionDetector
from hardening.ood.families import synthetic_families
from hardening.ood.pipeline import fit_ensemble, prepare_model
from hardening.ood.views import MAX_PROJECTION_VALUES, choose_input_view
from hardening.torch_source import load_torch_source
from runtime_guard.anomaly import AnomalyFormatError, AnomalyInputError, AnomalyScorer, InputView
from runtime_guard.errors import LoadError


@pytest.fixture(scope="module")
def compact(digits_demo):
    """The demo's gate fitted on a 1x4x4 average-pooled input view (budget 16 values)."""
    ds = load_dataset(digits_demo.data_path)
    pm = prepare_model(digits_demo.model_path, ds, max_input_values=16)
    ens, _, _ = fit_ensemble(pm, ds, 0.05)
    npz, meta = export_detectors(ens, model=pm.model_meta())
    return ds, pm, ens, AnomalyScorer.from_bytes(npz, meta)


def test_choose_input_view_fits_the_budget():
    img = choose_input_view((3, 96, 96))  # GateBudget().input_values = 256: equal 12x12 bins
    assert (img.kind, img.out, img.width) == ("avgpool", (8, 8), 192)
    assert choose_input_view((3, 96, 96), max_values=1024).out == (16, 16)  # the previous budget
    assert choose_input_view((3, 50, 50), max_values=256).out == (9, 9)  # equal bins (5x5) would lose over half
    assert choose_input_view((1, 8, 8)).kind == "flatten" and choose_input_view((30,)).width == 30
    odd = choose_input_view((3, 50, 37), max_values=100)
    assert odd.kind == "avgpool" and odd.width <= 100
    flat = choose_input_view((5000,), seed=3)
    assert flat.kind == "projection" and flat.matrix is not None
    assert flat.matrix.dtype == np.float32 and flat.matrix.size <= MAX_PROJECTION_VALUES
    np.testing.assert_array_equal(flat.matrix, choose_input_view((5000,), seed=3).matrix)  # seeded


@pytest.mark.parametrize("shape,out", [((3, 13, 10), (4, 3)), ((2, 96, 96), (16, 16)), ((1, 8, 8), (8, 8))])
def test_avgpool_view_is_torch_adaptive_avg_pool_and_the_gate_copy_agrees(shape, out):
    x = np.random.default_rng(0).random((5, *shape)).astype(np.float32)
    view = InputView("avgpool", shape, out)
    ours = view.apply(x)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), out).reshape(5, -1).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    copy = _InputView(view)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(copy, ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(AnomalyInputError, match="values per sample"):
        view.apply(x[:, :, :-1])


def test_compact_view_is_recorded_and_applied_identically(compact):
    ds, pm, ens, scorer = compact
    assert scorer.meta["input_view"] == {"kind": "avgpool", "shape": [1, 8, 8], "out": [4, 4], "width": 16}
    assert {d.name: d.width for d in scorer.detectors if d.view == "input"} == {"input_knn": 16, "pca": 16}
    for x in (ds.x, ds.ood["heldout"], *synthetic_families(ds, n=60, seed=2).values()):
        v = pm.views(x)  # the fit-time views: compact input
        assert v.input.shape == (len(x), 16)
        run = scorer.scores_by_detector(x, v.logits, v.features)  # the device: raw input
        for name, fit in ens.scores_by_detector(v).items():
            np.testing.assert_allclose(run[name], fit, rtol=1e-5, atol=2e-5, err_msg=name)
    # read back from disk, the view is the same view
    again = AnomalyScorer.from_bytes(scorer.npz_bytes, json.loads(json.dumps(scorer.meta)))
    np.testing.assert_array_equal(again.input_view.apply(ds.x), scorer.input_view.apply(ds.x))


@pytest.mark.parametrize("rule", ["mean_pos_z", "mean_z", "max_z"])
def test_gate_copy_equals_the_runtime_on_the_compact_view(digits_demo, compact, rule):
    ds, _, _, scorer = compact
    meta = json.loads(json.dumps(scorer.meta))
    meta["fusion"]["rule"] = rule
    sc = AnomalyScorer.from_bytes(scorer.npz_bytes, meta)
    guarded = GuardedTorch(load_torch_source(digits_demo.torch_path), TorchGate(sc))
    sess = ort.InferenceSession(str(digits_demo.model_path), providers=["CPUExecutionProvider"])
    fams = synthetic_families(ds, n=64, seed=1)
    for x in (ds.x, ds.ood["heldout"], fams["uniform"], fams["inverted"]):
        lg, ft = sess.run(["logits", "features"], {"input": np.ascontiguousarray(x, np.float32)})
        chk = check_copy(guarded, sc, x, lg, ft)
        assert chk.ok and chk.max_abs_error < 1e-3, chk
        assert chk.decisions_agree >= 0.99, chk  # float32 runtime vs float64 copy at the threshold


def test_banks_and_matrices_stay_within_the_size_budget():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 64)), rng.integers(0, 3, 600)
    budget = 2048
    ik = InputKNNDetector(max_values=budget).fit(x)
    assert ik.bank_.shape == (32, 64) and ik.export()[1] | {"normalize": None} == {
        "n_neighbors": 1, "normalize": None, "bank_size": 32, "max_values": budget}  # recorded in detectors.json
    assert KNNDetector(max_bank=10, max_values=budget).fit(x).bank_.shape == (10, 64)
    m = MahalanobisDetector(max_values=budget).fit(x, y)
    # the device multiplies by W and the 3 class cross terms: 64 * (29 + 3) = budget
    assert m.rank_ == 29 and m.export()[0]["factor"].shape == (64, 29)
    assert sum(b.size for b, _ in m.runtime_.blocks()) == budget
    # truncated: the leading-variance directions of the tied covariance, whitened
    cov = np.linalg.inv(m.precision_)
    var, vec = np.linalg.eigh(cov)
    top = vec[:, np.argsort(var)[::-1][:29]] / np.sqrt(np.sort(var)[::-1][:29])
    t = rng.normal(size=(20, 64)) * 2
    want = (((t @ top)[:, None, :] - (m.means_ @ top)[None]) ** 2).sum(2).min(1)
    np.testing.assert_allclose(m.score_samples(t), want, rtol=1e-4, atol=1e-3)
    p = PCAReconstructionDetector(n_components=60, max_values=budget).fit(x)
    assert p.export()[0]["components"].shape == (31, 64)  # + the mean's column
    assert sum(b.size for b, _ in p.runtime_.blocks()) == budget
    full = MahalanobisDetector().fit(x, y)  # 64 x 64 fits the default budget: exact, full rank
    assert full.rank_ == 64


def test_exported_arrays_are_float32_and_bounded(compact):
    _, _, _, scorer = compact
    with np.load(io.BytesIO(scorer.npz_bytes), allow_pickle=False) as z:
        assert all(z[k].dtype == np.float32 for k in z.files)
        assert max(z[k].size for k in z.files) <= 2**16  # GateBudget().matrix_values


def _format_1(ens, meta: dict) -> tuple[bytes, dict]:
    """The file the previous release wrote: float64, Mahalanobis as means + precision, raw input."""
    arrays = {}
    for name, det in ens.detectors.items():
        if det.kind == "mahalanobis":
            arrays |= {f"{name}__means": det.means_, f"{name}__precision": det.precision_}
        else:
            arrays |= {f"{name}__{k}": np.asarray(v, np.float64) for k, v in det.export()[0].items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    old = {k: v for k, v in json.loads(json.dumps(meta)).items() if k != "input_view"}
    old["format"] = "edgeward-ood/1"
    return buf.getvalue(), old


def test_a_format_1_file_loads_and_scores_as_before(digits_demo):
    ds = load_dataset(digits_demo.data_path)
    pm = prepare_model(digits_demo.model_path, ds)  # 64 input values: flatten, as format /1 did
    ens, _, test = fit_ensemble(pm, ds, 0.05)
    npz, meta = export_detectors(ens, model=pm.model_meta())
    new, old = AnomalyScorer.from_bytes(npz, meta), AnomalyScorer.from_bytes(*_format_1(ens, meta))
    assert old.input_view.kind == "flatten" and old.input_view.shape is None
    a, b = new.scores_by_detector(ds.x, test.logits, test.features), old.scores_by_detector(ds.x, test.logits, test.features)
    for name in a:  # precision P = W W^T exactly (full rank): the same distances to float32 rounding
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(old.score(ds.x, test.logits, test.features), new.score(ds.x, test.logits, test.features),
                               rtol=0, atol=1e-3)


def test_unknown_format_and_bad_input_views_are_refused_at_load(compact):
    _, _, _, scorer = compact
    meta = json.loads(json.dumps(scorer.meta))
    with pytest.raises(LoadError, match="edgeward-ood/2"):
        AnomalyScorer.from_bytes(scorer.npz_bytes, {**meta, "format": "edgeward-ood/3"})
    for view in ({"kind": "avgpool", "shape": [1, 8, 8], "out": [9, 4]}, {"kind": "mystery", "shape": [64]},
                 {"kind": "projection", "shape": [64]}, {"kind": "flatten", "shape": [0]}):
        with pytest.raises(AnomalyFormatError, match="input_view"):
            AnomalyScorer.from_bytes(scorer.npz_bytes, {**meta, "input_view": view})
    with pytest.raises(AnomalyFormatError, match="input_view gives"):  # detectors read 16 values, view gives 64
        AnomalyScorer.from_bytes(scorer.npz_bytes, {**meta, "input_view": {"kind": "flatten", "shape": [1, 8, 8]}})
