"""Output policies: top-1 kept for honest inputs, label-only is exactly one-hot, misinformation only on OOD."""

from __future__ import annotations

import numpy as np
import pytest
from art.defences.postprocessor import ReverseSigmoid

from runtime_guard.config import OutputPolicyConfig
from runtime_guard.output_policy import OUTPUT_POLICIES, OutputPolicy, softmax


def _logits(n: int = 500, c: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # mix of confident and near-tied rows
    scale = rng.choice([0.1, 1.0, 5.0, 20.0], size=(n, 1))
    return (rng.standard_normal((n, c)) * scale).astype(np.float32)


def test_softmax_is_a_distribution_and_stable():
    z = _logits()
    z[0] = [1000, -1000, 0, 0, 0, 0]  # would overflow a naive exp
    p = softmax(z)
    assert p.dtype == np.float64 and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(p.argmax(1), z.argmax(1))
    np.testing.assert_allclose(p[1], np.exp(z[1].astype(np.float64)) / np.exp(z[1].astype(np.float64)).sum())


@pytest.mark.parametrize("policy", [p for p in OUTPUT_POLICIES if p != "adaptive_misinformation"] + ["adaptive_misinformation"])
def test_top1_label_is_the_raw_model_argmax_for_honest_inputs(policy):
    z = _logits()
    labels, scores = OutputPolicy(OutputPolicyConfig(policy=policy, k=2)).apply(z, np.zeros(len(z), bool))
    np.testing.assert_array_equal(labels, z.argmax(1))
    assert scores.shape == z.shape
    top = scores.max(1)
    # the raw top-1 class also holds the highest released score (ties allowed only after rounding)
    assert (scores[np.arange(len(z)), labels] == top).all()
    if policy != "rounded":
        np.testing.assert_array_equal(scores.argmax(1), labels)


def test_full_is_plain_softmax():
    z = _logits()
    _, s = OutputPolicy(OutputPolicyConfig(policy="full")).apply(z)
    np.testing.assert_array_equal(s, softmax(z))


def test_label_only_returns_exactly_one_hot():
    z = _logits()
    labels, s = OutputPolicy(OutputPolicyConfig(policy="label_only")).apply(z)
    assert set(np.unique(s)) == {0.0, 1.0}
    np.testing.assert_array_equal(s.sum(1), 1.0)
    np.testing.assert_array_equal(s, np.eye(z.shape[1])[z.argmax(1)])


@pytest.mark.parametrize("k", [1, 2, 3, 6, 10])
def test_top_k_keeps_exactly_k_true_probabilities(k):
    z = _logits()
    labels, s = OutputPolicy(OutputPolicyConfig(policy="top_k", k=k)).apply(z)
    p = softmax(z)
    kk = min(k, z.shape[1])
    assert ((s > 0).sum(1) == kk).all()
    kept = s > 0
    np.testing.assert_array_equal(s[kept], p[kept])
    # the kept ones are the k largest
    np.testing.assert_array_equal(np.sort(s, 1)[:, -kk:], np.sort(p, 1)[:, -kk:])


@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_rounded(decimals):
    z = _logits()
    _, s = OutputPolicy(OutputPolicyConfig(policy="rounded", decimals=decimals)).apply(z)
    np.testing.assert_array_equal(s, np.round(softmax(z), decimals))


def test_reverse_sigmoid_matches_art_and_keeps_top1():
    z = _logits(2000)
    p = softmax(z)
    for beta, gamma in [(1.0, 0.1), (0.5, 0.5), (3.0, 1.0)]:
        labels, s = OutputPolicy(OutputPolicyConfig(policy="reverse_sigmoid", beta=beta, gamma=gamma)).apply(z)
        art = ReverseSigmoid(beta=beta, gamma=gamma)(p)
        same = art.argmax(1) == labels  # rows where ART already keeps top-1: identical numbers
        np.testing.assert_allclose(s[same], art[same], rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(s.argmax(1), labels)  # our swap fixes the rest
        np.testing.assert_allclose(s.sum(1), 1.0, atol=1e-12)
        assert (s >= 0).all()
        assert np.abs(s - p).max() > 0.05, "the perturbation must actually change the vector"


def test_adaptive_misinformation_lies_only_to_ood_rows():
    z = _logits(400)
    ood = np.zeros(len(z), bool)
    ood[::3] = True
    pol = OutputPolicy(OutputPolicyConfig(policy="adaptive_misinformation"))
    labels, s = pol.apply(z, ood)
    raw = z.argmax(1)
    p = softmax(z)
    np.testing.assert_array_equal(s[~ood], p[~ood])
    np.testing.assert_array_equal(labels[~ood], raw[~ood])
    confident = ood & (z.max(1) - np.sort(z, 1)[:, -2] > 1e-3)
    assert (labels[confident] != raw[confident]).all()
    np.testing.assert_array_equal(labels[ood], s[ood].argmax(1))
    np.testing.assert_allclose(s[ood].sum(1), 1.0, atol=1e-12)
    # the raw top-1 becomes the least likely released class
    np.testing.assert_array_equal(s[confident].argmin(1), raw[confident])
    with pytest.raises(ValueError, match="OOD"):
        pol.apply(z, None)
