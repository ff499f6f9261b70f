"""Attack adapters and estimators on real onnxruntime sessions and real ART attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.estimators import (
    BPDARounding,
    OrtLogits,
    QueryCounter,
    StraightThrough,
    image_view,
    margin_input_gradients,
    onnx_classifier,
    torch_classifier,
    torch_logits,
)
from attacks.evasion import SkipAttack, check_attack_names, craft, parse_norm
from hardening.data import load_dataset
from hardening.errors import InputError
from hardening.intake import load_model, make_session, predict_logits
from hardening.torch_source import load_torch_source
from hardening.zoo import DigitsCNN


@pytest.fixture(scope="module")
def digits(digits_demo):
    ds = load_dataset(digits_demo.data_path)
    info = load_model(digits_demo.model_path)
    sess = make_session(digits_demo.model_path)
    ort_fn = OrtLogits(sess, info.input_name, info.logits_output, ds.sample_shape)
    return ds, info, sess, ort_fn, load_torch_source(digits_demo.torch_path)


def test_query_counter_attributes_rows_to_their_original():
    rng = np.random.default_rng(0)
    ref = rng.random((5, 1, 8, 8)).astype(np.float32)
    c = QueryCounter()
    c.set_reference(ref)
    rows = np.concatenate([ref[[3, 3, 1]], ref[[0]]]) + rng.uniform(-0.05, 0.05, (4, 1, 8, 8)).astype(np.float32)
    c.record(rows)
    c.record(ref[[3]])
    assert c.total == 5
    assert c.per_example.tolist() == [1, 1, 0, 3, 0]


@pytest.mark.parametrize("n, dim", [(3, 12), (40, 64), (120, 3 * 16 * 16)])
def test_query_attribution_equals_the_nearest_reference_by_brute_force(n, dim):
    rng = np.random.default_rng(n)
    ref = rng.random((n, dim), dtype=np.float32)
    rows = np.clip(ref[rng.integers(0, n, 3 * n)] + rng.uniform(-0.15, 0.15, (3 * n, dim)).astype(np.float32), 0, 1)
    c = QueryCounter()
    c.set_reference(ref)
    c.record(rows[: n])
    c.record(rows[n:])
    d = ((rows[:, None, :] - ref[None, :, :]) ** 2).sum(2)
    assert c.per_example.tolist() == np.bincount(d.argmin(1), minlength=n).tolist()


def test_onnx_classifier_scores_and_labels_match_session(digits):
    ds, info, sess, ort_fn, _ = digits
    x = ds.x[:20]
    want = predict_logits(sess, info, x)
    scores = onnx_classifier(ort_fn, 6, (0.0, 1.0)).predict(x)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    labels = onnx_classifier(ort_fn, 6, (0.0, 1.0), labels_only=True).predict(x)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert (labels.sum(1) == 1).all() and (labels.argmax(1) == want.argmax(1)).all()


def test_torch_classifier_returns_logits_not_probabilities(digits):
    ds, _, _, ort_fn, module = digits
    est = torch_classifier(module, ds.sample_shape, 6, (0.0, 1.0))
    out = est.predict(ds.x[:16])
    np.testing.assert_allclose(out, ort_fn(ds.x[:16]), atol=1e-3)
    assert not np.allclose(out.sum(1), 1.0)  # raw logits


def test_straight_through_forward_is_deployed_backward_is_parent(digits):
    ds, _, _, ort_fn, _ = digits
    torch.manual_seed(1)
    other = DigitsCNN().eval()  # a parent that differs from the deployed model
    st = StraightThrough(other, ort_fn)
    x = torch.from_numpy(ds.x[:8]).requires_grad_(True)
    out = st(x)
    np.testing.assert_allclose(out.detach().numpy(), ort_fn(ds.x[:8]), atol=1e-5)
    out[:, 0].sum().backward()
    x2 = torch.from_numpy(ds.x[:8]).requires_grad_(True)
    other(x2)[0][:, 0].sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x2.grad.numpy(), atol=1e-6)


def test_margin_gradients_nonzero_for_plain_model_zero_after_rounding(digits):
    ds, _, _, _, module = digits

    class Rounded(torch.nn.Module):
        def forward(self, x):
            return module(torch.round(x * 16) / 16)

    g = margin_input_gradients(module, ds.x[:8], ds.y[:8])
    assert (np.abs(g).reshape(8, -1).max(1) > 0).all()
    assert np.abs(margin_input_gradients(Rounded(), ds.x[:8], ds.y[:8])).max() == 0
    # BPDA: same forward values, gradients restored by straight-through rounding
    st = BPDARounding(Rounded())
    xt = torch.from_numpy(ds.x[:8])
    with torch.no_grad():
        np.testing.assert_array_equal(st(xt)[0].numpy(), Rounded()(xt)[0].numpy())
    assert (np.abs(margin_input_gradients(st, ds.x[:8], ds.y[:8])).reshape(8, -1).max(1) > 0).all()


def test_pgd_breaks_points_and_stays_in_ball(digits):
    ds, _, _, ort_fn, module = digits
    est = torch_classifier(module, ds.sample_shape, 6, (0.0, 1.0))
    x, y = ds.x[:32], ds.y[:32]
    adv = craft("pgd", est, x, y, 0.2, np.inf, {"max_iter": 10, "num_random_init": 0}, seed=0)
    assert np.abs(adv - x).max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (ort_fn.labels(adv) != y).mean() > 0.5


def test_square_on_flat_inputs_uses_4d_view(tabular_demo):
    ds = load_dataset(tabular_demo.data_path)
    info = load_model(tabular_demo.model_path)
    f = OrtLogits(make_session(tabular_demo.model_path), info.input_name, info.logits_output, ds.sample_shape)
    x, y = ds.x[:16], ds.y[:16]
    assert image_view((30,)) == (1, 5, 6) and image_view((31,)) is None and image_view((1, 8, 8)) is None
    est = onnx_classifier(f, 2, (0.0, 1.0), view_shape=image_view((30,)))
    adv = craft("square", est, x, y, 0.3, np.inf, {"max_iter": 50, "nb_restarts": 1})
    assert adv.shape == x.shape and np.abs(adv - x).max() <= 0.3 + 1e-6
    with pytest.raises(SkipAttack, match="4-D image"):
        craft("square", onnx_classifier(f, 2, (0.0, 1.0)), x, y, 0.3, np.inf, {"max_iter": 5, "nb_restarts": 1})
    with pytest.raises(SkipAttack, match="3 classes"):
        est2 = torch_classifier(load_torch_source(tabular_demo.torch_path), ds.sample_shape, 2, (0.0, 1.0))
        craft("apgd-dlr", est2, x, y, 0.1, np.inf, {"max_iter": 5, "nb_random_init": 1})


def test_bad_names_and_norms_are_input_errors(digits):
    ds, _, _, _, module = digits
    with pytest.raises(InputError, match="unknown attack"):
        check_attack_names(["pgd", "carlini"])
    with pytest.raises(InputError, match="unknown attack"):
        craft("nope", torch_classifier(module, ds.sample_shape, 6, (0.0, 1.0)), ds.x[:2], ds.y[:2], 0.1, np.inf, {})
    with pytest.raises(InputError, match="norm"):
        parse_norm("1")
    assert parse_norm("inf") == np.inf and parse_norm("2") == 2
    assert check_attack_names(["square", "fgsm"]) == ("fgsm", "square")  # cheap first


def test_torch_logits_matches_onnx(digits):
    ds, _, _, ort_fn, module = digits
    np.testing.assert_allclose(torch_logits(module, ds.x[:10]), ort_fn(ds.x[:10]), atol=1e-3)
