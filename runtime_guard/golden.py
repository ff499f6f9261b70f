"""The golden smoke set a bundle carries: inputs and the packaged model's own outputs on them.

It travels as the ``smoke.npz`` payload (encrypted and covered by the signed manifest's
payload digests), so its size does not count against the 1 MiB manifest cap whatever the
input shape; the manifest's ``smoke_test`` field only names the payload and the tolerance.
Older bundles carry the set inline in ``smoke_test``; both read into one ``GoldenSet``.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import LoadError

SMOKE_FIELD = "smoke_test"
SMOKE_PAYLOAD = "smoke.npz"
_ARRAYS = {"inputs": np.float32, "expected_labels": np.int64, "expected_logits": np.float32}


class GoldenSetError(LoadError, ValueError):
    """The signed golden set is malformed (a packaging bug or a hand-made bundle)."""

    check = "smoke-test"


@dataclass(frozen=True)
class GoldenSet:
    inputs: np.ndarray
    expected_labels: np.ndarray
    expected_logits: np.ndarray | None
    atol: float

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        if self.expected_logits is None:
            np.savez(buf, inputs=self.inputs, expected_labels=self.expected_labels)
        else:
            np.savez(buf, inputs=self.inputs, expected_labels=self.expected_labels, expected_logits=self.expected_logits)
        return buf.getvalue()

    def check(self, logits: np.ndarray) -> None:
        """Raise ``GoldenSetError`` if ``logits`` (the model's on ``inputs``) disagree."""
        got = logits.argmax(axis=1)
        want = self.expected_labels
        if got.shape != want.shape or not np.array_equal(got, want):
            bad = int(np.sum(got != want)) if got.shape == want.shape else len(want)
            raise GoldenSetError(f"{bad} of {len(want)} golden labels differ")
        ref = self.expected_logits
        if ref is not None and (ref.shape != logits.shape or not np.allclose(logits, ref, atol=self.atol, rtol=1e-3)):
            raise GoldenSetError("golden logits differ beyond tolerance")


def golden_fields(golden: GoldenSet) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Manifest field and payload for packaging."""
    return {"payload": SMOKE_PAYLOAD, "atol": golden.atol, "n": int(len(golden.inputs))}, {SMOKE_PAYLOAD: golden.to_npz()}


def read_golden(manifest: dict[str, Any], payloads: dict[str, bytes]) -> GoldenSet | None:
    """The bundle's golden set, or None if it has none."""
    field = manifest.get(SMOKE_FIELD)
    if field is None:
        return None
    if not isinstance(field, dict):
        raise GoldenSetError("smoke_test must be an object")
    atol = field.get("atol", 1e-4)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise GoldenSetError("smoke_test.atol must be a non-negative number")
    if "payload" in field:
        name = field["payload"]
        if name not in payloads:
            raise GoldenSetError(f"smoke_test names payload {name!r}, which the bundle lacks")
        try:
            with np.load(io.BytesIO(payloads[name]), allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise GoldenSetError(f"payload {name!r} is not a readable .npz: {e}") from None
    else:  # inline (bundles written before the payload form)
        raw = {k: field[k] for k in _ARRAYS if field.get(k) is not None}
    unknown = set(raw) - set(_ARRAYS)
    if unknown or "inputs" not in raw or "expected_labels" not in raw:
        raise GoldenSetError("smoke_test needs 'inputs' and 'expected_labels' (and optionally 'expected_logits')")
    try:
        arrays = {k: np.asarray(v, dtype=_ARRAYS[k]) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise GoldenSetError(f"smoke_test arrays are not numeric: {e}") from None
    x, y = arrays["inputs"], arrays["expected_labels"]
    if x.ndim < 2 or y.shape != (len(x),):
        raise GoldenSetError(f"smoke_test shapes do not match: inputs {x.shape}, labels {y.shape}")
    return GoldenSet(x, y, arrays.get("expected_logits"), float(atol))
