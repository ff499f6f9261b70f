"""The golden smoke set travels as a signed payload, so any input size fits the manifest cap."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from runtime_guard.golden import GoldenSet, GoldenSetError, golden_fields, read_golden


def _golden(shape=(3, 96, 96), n=16):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n, 10)).astype(np.float32)
    return GoldenSet(rng.uniform(size=(n, *shape)).astype(np.float32), logits.argmax(1), logits, 1e-4)


def test_large_inputs_stay_out_of_the_manifest():
    g = _golden()
    field, payloads = golden_fields(g)
    assert len(json.dumps(field)) < 100  # 16 x 3x96x96 floats would be ~5 MB of JSON inline
    back = read_golden({"smoke_test": field}, payloads)
    assert back is not None and np.array_equal(back.inputs, g.inputs) and back.atol == 1e-4
    back.check(g.expected_logits)
    with pytest.raises(GoldenSetError, match="golden labels differ"):
        back.check(g.expected_logits[::-1])


def test_inline_sets_of_older_bundles_still_read():
    g = _golden((4,), 3)
    field = {"inputs": g.inputs.tolist(), "expected_labels": g.expected_labels.tolist(), "atol": 1e-3}
    back = read_golden({"smoke_test": field}, {})
    assert back.expected_logits is None and back.inputs.shape == (3, 4)
    assert read_golden({}, {}) is None


@pytest.mark.parametrize("case", ["missing_payload", "object_array", "bad_shape", "bad_atol", "extra_array"])
def test_malformed_golden_sets_are_refused(case):
    field, payloads = golden_fields(_golden((4,), 3))
    if case == "missing_payload":
        payloads = {}
    elif case == "object_array":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        payloads = {"smoke.npz": buf.getvalue()}
    elif case == "bad_shape":
        buf = io.BytesIO()
        np.savez(buf, inputs=np.zeros((3, 4), np.float32), expected_labels=np.zeros(2, np.int64))
        payloads = {"smoke.npz": buf.getvalue()}
    elif case == "bad_atol":
        field = {**field, "atol": -1}
    else:
        buf = io.BytesIO()
        np.savez(buf, inputs=np.zeros((3, 4), np.float32), expected_labels=np.zeros(3, np.int64), code=np.zeros(1))
        payloads = {"smoke.npz": buf.getvalue()}
    with pytest.raises(GoldenSetError):
        read_golden({"smoke_test": field}, payloads)
