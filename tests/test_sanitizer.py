"""Sanitizer: each malformed input is refused with its own reason; valid inputs pass bit-identically."""

from __future__ import annotations

import numpy as np
import pytest

from hardening.intake import make_session
from runtime_guard.config import ExtractionMonitorConfig, GuardConfig, InputSchema, RateLimitConfig
from runtime_guard.guard import GuardedModel
from runtime_guard.sanitizer import Sanitizer, SanitizerError

SAMPLE = (1, 8, 8)


@pytest.fixture
def san() -> Sanitizer:
    return Sanitizer(InputSchema(max_batch=8, value_range=(0.0, 1.0), max_bytes=64 * 1024), SAMPLE)


def _reason(san: Sanitizer, x) -> str:
    with pytest.raises(SanitizerError) as ei:
        san(x)
    return ei.value.reason


def _ok() -> np.ndarray:
    return np.random.default_rng(0).random((2, *SAMPLE), dtype=np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_rejected(san, bad):
    x = _ok()
    x[1, 0, 3, 4] = bad
    assert _reason(san, x) == "non_finite"


def test_non_finite_beats_clip():
    san = Sanitizer(InputSchema(value_range=(0.0, 1.0), out_of_range="clip"), SAMPLE)
    x = _ok()
    x[0, 0, 0, 0] = np.nan
    assert _reason(san, x) == "non_finite"


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8, np.bool_])
def test_wrong_dtype_is_rejected(san, dtype):
    assert _reason(san, _ok().astype(dtype)) == "dtype"


@pytest.mark.parametrize("shape", [(2, 1, 8, 7), (2, 2, 8, 8), (2, 64), (1, 1, 1, 8, 8), (8,)])
def test_wrong_shape_is_rejected(san, shape):
    assert _reason(san, np.zeros(shape, dtype=np.float32)) == "shape"


def test_batch_size_limits(san):
    assert _reason(san, np.zeros((9, *SAMPLE), dtype=np.float32)) == "batch_size"
    assert _reason(san, np.zeros((0, *SAMPLE), dtype=np.float32)) == "batch_size"
    assert san(np.zeros((8, *SAMPLE), dtype=np.float32)).shape == (8, *SAMPLE)


def test_byte_limit_checked_before_anything_else():
    san = Sanitizer(InputSchema(max_batch=10_000, max_bytes=1024), SAMPLE)
    huge = np.full((100, *SAMPLE), np.nan, dtype=np.float32)  # also NaN: bytes wins, it is cheaper
    assert _reason(san, huge) == "bytes"
    assert _reason(san, np.zeros((5, *SAMPLE)).tolist()) == "bytes"


@pytest.mark.parametrize("lo_hi", [(-0.01, 0.5), (0.2, 1.0001)])
def test_out_of_range_is_rejected(san, lo_hi):
    x = _ok()
    x[0, 0, 0, 0], x[1, 0, 7, 7] = lo_hi
    assert _reason(san, x) == "range"


def test_out_of_range_is_clipped_when_configured():
    san = Sanitizer(InputSchema(value_range=(0.0, 1.0), out_of_range="clip"), SAMPLE)
    x = _ok()
    x[0, 0, 0, 0], x[1, 0, 0, 1] = -3.0, 7.5
    out = san(x)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0, 0] == 0.0 and out[1, 0, 0, 1] == 1.0
    assert x[0, 0, 0, 0] == -3.0, "the caller's array must not be modified"
    np.testing.assert_array_equal(out[0, 0, 1:], x[0, 0, 1:])


@pytest.mark.parametrize(
    "payload, reason",
    [
        ([[[["a"] * 8] * 8]], "not_numeric"),
        ([[[[0.5] * 7 + ["0.5"]] * 8]], "not_numeric"),  # numeric strings are not numbers
        ([[[[True] * 8] * 8]], "not_numeric"),
        ([[[[None] * 8] * 8]], "not_numeric"),
        ([[[[{"x": 1}] * 8] * 8]], "not_numeric"),
        ([[[[0.5] * 8] * 7 + [[0.5] * 7]]], "shape"),  # ragged row
        ([[[[0.5] * 8] * 8], [[[0.5] * 8] * 7]], "shape"),  # ragged batch
        ("0.5", "not_numeric"),
        ({"x": [0.5]}, "not_numeric"),
        (None, "not_numeric"),
        (np.array(["a", "b"]), "not_numeric"),
        ([[[[1e39] * 8] * 8]], "non_finite"),  # overflows float32
    ],
)
def test_json_like_payloads(san, payload, reason):
    assert _reason(san, payload) == reason


def test_error_messages_are_specific(san):
    with pytest.raises(SanitizerError, match=r"shape: .*ragged"):
        san([[[[0.5] * 8] * 8], [[[0.5] * 8] * 7]])
    with pytest.raises(SanitizerError, match=r"batch_size: batch of 9, allowed 1..8"):
        san(np.zeros((9, *SAMPLE), dtype=np.float32))


def test_valid_array_passes_unchanged(san):
    x = _ok()
    assert san(x) is x  # no copy on the hot path
    one = san(x[0])  # unbatched sample gets a batch dim
    assert one.shape == (1, *SAMPLE) and np.shares_memory(one, x)
    nested = san(x.tolist())
    np.testing.assert_array_equal(nested, x)
    assert nested.dtype == np.float32


def test_non_contiguous_input_is_made_contiguous(san):
    x = np.asfortranarray(_ok())
    out = san(x)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, x)


def test_schema_shape_must_fit_model_rank():
    with pytest.raises(ValueError, match="rank"):
        Sanitizer(InputSchema(sample_shape=(64,)), (1, 8, 8))


def test_guarded_outputs_are_bit_identical_to_bare_session(digits_demo):
    sess = make_session(digits_demo.model_path)
    cfg = GuardConfig(
        input=InputSchema(value_range=(0.0, 1.0)),
        rate_limit=RateLimitConfig(per_client=None),
        extraction=ExtractionMonitorConfig(enabled=False),  # repeated queries would (rightly) be flagged
    )
    guard = GuardedModel(make_session(digits_demo.model_path), cfg)
    with np.load(digits_demo.data_path) as d:
        x = d["x"][:40]
    for batch in (x[:1], x[:7], x):
        bare = sess.run(None, {"input": batch})[0]
        for payload in (batch, batch.tolist()):
            res = guard.predict(payload, "c")
            assert res.decision == "accepted"
            assert res.logits.tobytes() == bare.tobytes()
            np.testing.assert_array_equal(res.labels, bare.argmax(1))


@pytest.mark.parametrize(
    "bad, reason",
    [
        (np.full((1, *SAMPLE), np.nan, dtype=np.float32), "non_finite"),
        (np.zeros((1, *SAMPLE), dtype=np.float64), "dtype"),
        (np.zeros((1, 1, 4, 16), dtype=np.float32), "shape"),
        (np.zeros((65, *SAMPLE), dtype=np.float32), "batch_size"),
        (np.full((1, *SAMPLE), 1.5, dtype=np.float32), "range"),
        ([[["x"] * 8] * 8], "not_numeric"),
    ],
)
def test_guard_reports_sanitizer_reason(digits_demo, bad, reason):
    cfg = GuardConfig(input=InputSchema(value_range=(0.0, 1.0), max_batch=64))
    guard = GuardedModel(make_session(digits_demo.model_path), cfg)
    res = guard.predict(bad, "c")
    assert res.decision == "rejected" and res.reasons == [f"input:{reason}"]
    assert res.labels is None and res.scores is None and res.logits is None
    assert guard.snapshot()["reasons"][f"input:{reason}"] == 1


def test_dynamic_dims_are_free_but_not_empty():
    san = Sanitizer(InputSchema(), (None, 8))
    assert san(np.zeros((2, 3, 8), dtype=np.float32)).shape == (2, 3, 8)
    assert _reason(san, np.zeros((2, 0, 8), dtype=np.float32)) == "shape"
    assert _reason(san, np.zeros((2, 3, 7), dtype=np.float32)) == "shape"


def test_flat_tabular_model_through_the_guard(tabular_demo):
    sess = make_session(tabular_demo.model_path)
    cfg = GuardConfig(
        input=InputSchema(value_range=(0.0, 1.0), out_of_range="clip"),
        rate_limit=RateLimitConfig(per_client=None),
        extraction=ExtractionMonitorConfig(enabled=False),
    )
    guard = GuardedModel(make_session(tabular_demo.model_path), cfg)
    with np.load(tabular_demo.data_path) as d:
        x = d["x"][:20]
    res = guard.predict(x.tolist(), "c")
    assert res.decision == "accepted" and res.scores.shape == (20, 2)
    clipped = np.clip(x, 0.0, 1.0)  # test rows scaled with training min/max may leave [0, 1]
    assert res.logits.tobytes() == sess.run(None, {sess.get_inputs()[0].name: clipped})[0].tobytes()
    assert guard.predict(x[0], "c").labels.shape == (1,)  # one unbatched row
    assert guard.predict(x[:, :29], "c").reasons == ["input:shape"]
