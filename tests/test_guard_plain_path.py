"""The guard's plain path after the overhead work (issue 15): the sanitizer's value checks
read the extreme values with argmin/argmax and must refuse exactly what min()/max() would,
on any layout; plain acceptances share one immutable verdict; telemetry counts by enum
member but exports the same wire strings."""

from __future__ import annotations

import numpy as np
import pytest

from runtime_guard.config import ExtractionMonitorConfig, GuardConfig, InputSchema, RateLimitConfig
from runtime_guard.sanitizer import Sanitizer, SanitizerError
from runtime_guard.telemetry import DECISIONS, REASON_CODES, Telemetry
from runtime_guard.verdict import ACCEPTED, Decision, Reason, Verdict


def _expected(x: np.ndarray, lo: float, hi: float) -> str | None:
    """The reference decision, from numpy's own min/max."""
    mn, mx = float(x.min()), float(x.max())
    if not (np.isfinite(mn) and np.isfinite(mx)):
        return "non_finite"
    return "range" if mn < lo or mx > hi else None


@pytest.mark.parametrize("layout", ["c", "fortran", "strided", "unbatched"])
def test_sanitizer_extremes_match_min_max_on_every_layout(layout):
    rng = np.random.default_rng(7)
    shape = (3, 6, 6)
    s = Sanitizer(InputSchema(value_range=(0.0, 1.0), max_batch=8), list(shape))
    for trial in range(300):
        base = rng.random((4, 3, 12, 6), dtype=np.float32)
        k = trial % 6  # 0: clean; else one to three bad values anywhere
        for _ in range(k % 4):
            idx = tuple(rng.integers(0, n) for n in base.shape)
            base[idx] = rng.choice([np.nan, np.inf, -np.inf, 1.0 + 1e-3, -1e-3, 1.0, 0.0])
        x = {"c": np.ascontiguousarray(base[:, :, :6]), "fortran": np.asfortranarray(base[:, :, :6]),
             "strided": base[:, :, ::2], "unbatched": np.ascontiguousarray(base[0, :, :6])}[layout]
        want = _expected(x, 0.0, 1.0)
        if want is None:
            out = s(x)
            assert out.flags.c_contiguous and np.array_equal(out.reshape(x.shape), x)
            if layout == "c":
                assert out is x  # valid contiguous float32 passes through untouched
        else:
            with pytest.raises(SanitizerError) as e:
                s(x)
            assert e.value.reason == want, (trial, layout)


def test_sanitizer_clip_still_clips_after_the_extreme_check():
    s = Sanitizer(InputSchema(value_range=(0.0, 1.0), out_of_range="clip"), [5])
    x = np.array([[0.5, -2.0, 3.0, 1.0, 0.0]], dtype=np.float32)
    assert s(x).tolist() == [[0.5, 0.0, 1.0, 1.0, 0.0]]


def test_plain_acceptances_share_one_immutable_verdict(digits_demo):
    from runtime_guard.guard import GuardedModel

    assert ACCEPTED == Verdict(Decision.ACCEPTED) and ACCEPTED.reasons == () and ACCEPTED.refused_by is None
    with pytest.raises(AttributeError):
        ACCEPTED.decision = Decision.REJECTED  # type: ignore[misc]
    cfg = GuardConfig(input=InputSchema(value_range=(0.0, 1.0)), rate_limit=RateLimitConfig(per_client=None),
                      extraction=ExtractionMonitorConfig(enabled=False))
    g = GuardedModel(open(digits_demo.model_path, "rb").read(), cfg)
    with np.load(digits_demo.data_path, allow_pickle=False) as d:
        x = d["x"][:2].astype(np.float32)
    a, b = g.predict(x[:1], "c"), g.predict(x[1:], "c")
    assert a.verdict is ACCEPTED and b.verdict is ACCEPTED and a.decision == "accepted"
    with pytest.raises(AttributeError):  # slots: a typo'd attribute fails loudly
        a.labells = None  # type: ignore[attr-defined]
    snap = g.snapshot()
    assert snap["decisions"]["accepted"] == 2 and snap["requests_total"] == 2


def test_telemetry_exports_wire_strings_in_a_fixed_order():
    t = Telemetry(GuardConfig().telemetry, 3)
    t.record(ACCEPTED, 1e-4, np.array([1]))
    t.record(Verdict.refused(Decision.REJECTED, Reason.INPUT_RANGE), 1e-4)
    t.record(Verdict(Decision.FLAGGED, (Reason.OOD, Reason.EXTRACTION)), 1e-4, np.array([2]))
    snap = t.snapshot()
    assert tuple(snap["decisions"]) == DECISIONS and tuple(snap["reasons"]) == REASON_CODES
    assert all(type(k) is str for k in (*snap["decisions"], *snap["reasons"]))
    assert snap["decisions"] == {"accepted": 1, "flagged": 1, "rejected": 1, "rate_limited": 0}
    assert {k: v for k, v in snap["reasons"].items() if v} == {"input:range": 1, "ood": 1, "extraction": 1}
    t.reset()
    assert sum(t.snapshot()["decisions"].values()) == 0
