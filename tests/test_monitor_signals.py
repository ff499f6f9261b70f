"""The extraction monitor's standardised distances and complementary per-client signals."""

from __future__ import annotations

import numpy as np

from runtime_guard.config import ExtractionMonitorConfig
from runtime_guard.extraction_monitor import ExtractionMonitor


def _feed(mon, cid, x, labels, rejected=None):
    for j in range(0, len(x), 10):
        mon.observe(cid, x[j:j + 10], labels[j:j + 10], None if rejected is None else rejected[j:j + 10])
    return mon.state(cid)


def test_rejection_rate_flags_a_client_the_gate_keeps_refusing():
    rng = np.random.default_rng(0)
    cfg = ExtractionMonitorConfig(delta=1e-9, min_queries=20, max_rejection_rate=0.2)
    mon = ExtractionMonitor(cfg)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 60)
    st = _feed(mon, "thief", x, labels, np.arange(60) % 2 == 0)  # half refused
    assert st.flagged and st.flag_reason == "rejections" and st.flagged_after == 20
    assert abs(st.rejection_rate - 0.5) < 1e-9
    st = _feed(mon, "honest", x, labels, np.zeros(60, bool))
    assert not st.flagged and st.rejection_rate == 0.0


def test_label_entropy_flags_a_one_class_stream_and_is_off_by_default():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    one_class = np.zeros(40, dtype=np.int64)
    on = ExtractionMonitor(ExtractionMonitorConfig(delta=1e-9, min_queries=20, min_label_entropy=0.5))
    st = _feed(on, "c", x, one_class)
    assert st.flagged and st.flag_reason == "label_entropy" and st.label_entropy == 0.0
    off = ExtractionMonitor(ExtractionMonitorConfig(delta=1e-9, min_queries=20))
    assert not _feed(off, "c", x, one_class).flagged


def test_standardised_distances_are_those_of_the_standardised_inputs():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 4)).astype(np.float32)
    center, scale = np.array([5.0, 0.0, -1.0, 2.0]), np.array([1000.0, 1.0, 0.5, 3.0])
    x = (z * scale + center).astype(np.float32)  # one coordinate would dominate raw distances
    labels = np.zeros(200, dtype=np.int64)
    plain = ExtractionMonitor(ExtractionMonitorConfig(delta=1e-9, min_queries=50))
    std = ExtractionMonitor(ExtractionMonitorConfig(delta=1e-9, min_queries=50, center=tuple(center),
                                                    scale=tuple(scale)))
    raw = ExtractionMonitor(ExtractionMonitorConfig(delta=1e-9, min_queries=50))
    w_z, w_std, w_raw = (_feed(plain, "c", z, labels).min_w, _feed(std, "c", x, labels).min_w,
                         _feed(raw, "c", x, labels).min_w)
    assert abs(w_z - w_std) < 1e-4 and abs(w_raw - w_std) > 1e-3
