"""Staged rollout cohorts: a stable hash of the device id against the signed percentage.

The bucket depends only on (channel, device id), never on the release, so the same
devices form the canary share of every release: a device in the first 25% is also in
the first 50%, and raising the percentage only adds devices.
"""

from __future__ import annotations

import hashlib

BUCKETS = 10_000  # percentages to 0.01


def bucket(device_id: str, channel: str) -> int:
    """0..BUCKETS-1, uniform over device ids, stable for the device's lifetime."""
    if not device_id:
        raise ValueError("device id must be a non-empty string")
    h = hashlib.sha256(f"edgeward/rollout/v1\0{channel}\0{device_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") % BUCKETS


def in_cohort(device_id: str, channel: str, percentage: float) -> bool:
    """True when this device gets a release rolled out to ``percentage`` % of the fleet."""
    if not 0 <= percentage <= 100:
        raise ValueError("percentage must be within 0..100")
    return bucket(device_id, channel) < round(percentage * BUCKETS / 100)
