"""The numpy runtime scorer reproduces fit-time scores and refuses malformed exports."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from hardening.data import load_dataset
from hardening.ood import export_detectors
from hardening.ood.families import synthetic_families
from hardening.ood.pipeline import fit_ensemble, prepare_model
from runtime_guard.anomaly import AnomalyFormatError, AnomalyInputError, AnomalyScorer


@pytest.fixture(scope="module")
def fitted(digits_demo):
    ds = load_dataset(digits_demo.data_path)
    pm = prepare_model(digits_demo.model_path, ds)
    ens, _, test = fit_ensemble(pm, ds, 0.05)
    npz, meta = export_detectors(ens, model=pm.model_meta())
    return ds, pm, ens, test, npz, meta


def test_runtime_scores_equal_fit_time_scores(fitted):
    ds, pm, ens, test, npz, meta = fitted
    scorer = AnomalyScorer.from_bytes(npz, meta)
    for x in [ds.x, *synthetic_families(ds, n=100).values(), ds.ood["heldout"]]:
        v = pm.views(x)
        # the runtime takes the model input as-is (NCHW float32), not the flattened float64 view
        fit_by, run_by = ens.scores_by_detector(v), scorer.scores_by_detector(x, v.logits, v.features)
        # the same code on the same float32 arrays; the products' blocking differs (one stacked
        # matrix per view at run time, one per detector at fit time): float32 rounding, which a
        # distance's square root lifts to ~1e-5 near 0
        for name in fit_by:
            np.testing.assert_allclose(run_by[name], fit_by[name], rtol=1e-5, atol=2e-5, err_msg=name)
        fused = scorer.score(x, v.logits, v.features)
        assert fused.dtype == np.float64
        np.testing.assert_allclose(fused, ens.score(v), rtol=0, atol=1e-3)
        np.testing.assert_array_equal(scorer.is_anomalous(fused), ens.predict(v).astype(bool))
    assert scorer.threshold == ens.threshold_
    assert scorer.detector_thresholds == {n: d.threshold_ for n, d in ens.detectors.items()}


def test_batch_one_matches_batch(fitted):
    ds, pm, _, test, npz, meta = fitted
    scorer = AnomalyScorer.from_bytes(npz, meta)
    full = scorer.score(ds.x, test.logits, test.features)
    one = [scorer.score(ds.x[i : i + 1], test.logits[i : i + 1], test.features[i : i + 1])[0] for i in range(5)]
    np.testing.assert_allclose(one, full[:5], rtol=0, atol=1e-4)  # z units; float32 products


def test_save_load_roundtrip_and_inf_threshold(fitted, tmp_path):
    ds, _, _, test, npz, meta = fitted
    AnomalyScorer.from_bytes(npz, meta).save(tmp_path)
    with np.load(tmp_path / "detectors.npz", allow_pickle=False) as z:
        assert all(z[k].dtype == np.float32 for k in z.files)  # banks and matrices in float32
    again = AnomalyScorer.load(tmp_path)
    np.testing.assert_array_equal(again.score(ds.x, test.logits, test.features), AnomalyScorer.from_bytes(npz, meta).score(ds.x, test.logits, test.features))
    inf_meta = json.loads(json.dumps({**meta, "threshold": None}))
    s = AnomalyScorer.from_bytes(npz, inf_meta)
    assert math.isinf(s.threshold) and not s.is_anomalous(np.array([1e300])).any()


def _tamper(meta, **changes):
    m = json.loads(json.dumps(meta))
    m.update(changes)
    return m


def test_malformed_exports_are_refused(fitted):
    _, _, _, _, npz, meta = fitted
    with pytest.raises(AnomalyFormatError, match="format"):
        AnomalyScorer.from_bytes(npz, _tamper(meta, format="other/9"))
    with pytest.raises(AnomalyFormatError, match="fusion"):
        AnomalyScorer.from_bytes(npz, _tamper(meta, fusion={"rule": "max", "members": ["knn"]}))
    bad = _tamper(meta)
    bad["detectors"][0]["kind"] = "mystery"
    with pytest.raises(AnomalyFormatError, match="unknown kind"):
        AnomalyScorer.from_bytes(npz, bad)
    with pytest.raises(AnomalyFormatError, match="npz"):
        AnomalyScorer.from_bytes(b"not a zip", meta)
    with np.load(io.BytesIO(npz), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "mahalanobis__factor"}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with pytest.raises(AnomalyFormatError, match="factor"):
        AnomalyScorer.from_bytes(buf.getvalue(), meta)
    buf = io.BytesIO()
    np.savez(buf, **arrays, mahalanobis__factor=np.array([{"a": 1}], dtype=object))
    with pytest.raises(AnomalyFormatError):
        AnomalyScorer.from_bytes(buf.getvalue(), meta)  # object arrays need pickle: refused
    with pytest.raises(AnomalyFormatError, match="threshold"):
        AnomalyScorer.from_bytes(npz, _tamper(meta, threshold="high"))


def test_bad_score_inputs_raise(fitted):
    ds, _, _, test, npz, meta = fitted
    scorer = AnomalyScorer.from_bytes(npz, meta)
    with pytest.raises(AnomalyInputError, match="features"):
        scorer.score(ds.x, test.logits, None)
    with pytest.raises(AnomalyInputError, match=f"expected {test.features.shape[1]}"):
        scorer.score(ds.x, test.logits, test.features[:, :10])
    with pytest.raises(AnomalyInputError, match="logits"):
        scorer.scores_by_detector(ds.x, test.logits[:, :3], test.features)
    with pytest.raises(AnomalyInputError, match="samples"):
        scorer.score(ds.x[:3], test.logits, test.features)
    x = ds.x.copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(AnomalyInputError, match="NaN"):
        scorer.score(x, test.logits, test.features)


def test_runtime_imports_without_sklearn_scipy_torch():
    code = (
        "import sys; import runtime_guard.anomaly; "
        "bad = [m for m in ('sklearn', 'scipy', 'torch', 'art', 'hardening') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_sided_fusion_lets_no_detector_cancel_the_others():
    """Under mean_z a detector that finds the input very typical (z << 0) hides the one that
    fires; mean_pos_z and max_z do not let it."""
    from runtime_guard.anomaly import FORMAT, AnomalyScorer, fuse_z

    z = np.array([[6.0, -6.0], [6.0, 0.0], [0.0, 0.0]])
    assert fuse_z(z, "mean_z")[0] == 0.0
    np.testing.assert_allclose(fuse_z(z, "mean_pos_z"), [3.0, 3.0, 0.0])
    np.testing.assert_allclose(fuse_z(z, "max_z"), [6.0, 6.0, 0.0])
    buf = io.BytesIO()
    np.savez(buf)

    def scorer(rule: str) -> AnomalyScorer:
        meta = {"format": FORMAT, "threshold": 1.0, "fusion": {"rule": rule, "members": ["msp", "energy"]},
                "detectors": [{"name": "msp", "kind": "msp", "view": "logits", "norm": {"mean": 0.5, "std": 0.1}},
                              {"name": "energy", "kind": "energy", "view": "logits", "norm": {"mean": -1.0, "std": 1.0}}]}
        return AnomalyScorer.from_bytes(buf.getvalue(), meta)

    # flat logits: msp is far out (z = 3.2); a huge constant offset makes energy look very typical
    logits = np.full((1, 5), 50.0)
    assert not scorer("mean_z").is_anomalous(scorer("mean_z").score(None, logits, None))[0]
    assert scorer("mean_pos_z").is_anomalous(scorer("mean_pos_z").score(None, logits, None))[0]
