"""Input sanitizer: only well-formed tensors reach onnxruntime.

Malformed inputs are the cheapest attack on an edge model (NaN poisoning of
telemetry, huge batches as denial of service, out-of-range pixels as evasion
aids), so every request is checked against the signed ``InputSchema`` and
refused with a machine-readable reason code. Valid float32 arrays pass through
untouched (same object, same bits) so guarded outputs equal bare-session ones.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .config import InputSchema
from .errors import PartsMismatch, RequestError
from .verdict import Reason, Stage

__all__ = ["SanitizerError", "Sanitizer", "REASONS"]

REASONS = tuple(r.code for r in Reason if r.stage is Stage.INPUT)


class SanitizerError(RequestError, ValueError):
    """The request tensor violates the input schema. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}", check=reason)
        self.reason = reason
        self.verdict_reason = Reason.of(Stage.INPUT, reason)


class Sanitizer:
    """Checks (in this order): bytes, numeric, dtype, shape, batch size, finite, range.

    ``model_sample_shape`` is the model input shape without the batch dim, with
    ``None`` for dynamic dims; the schema's ``sample_shape`` (if set) overrides it.
    """

    def __init__(self, schema: InputSchema, model_sample_shape: Sequence[int | None]) -> None:
        self.schema = schema
        shape = schema.sample_shape if schema.sample_shape is not None else tuple(model_sample_shape)
        if schema.sample_shape is not None and len(shape) != len(model_sample_shape):
            raise PartsMismatch(f"schema sample_shape {shape} does not match the model's rank {len(model_sample_shape)}")
        self.sample_shape: tuple[int | None, ...] = tuple(shape)
        self._ndim = len(self.sample_shape) + 1
        self._fixed = tuple((i + 1, d) for i, d in enumerate(self.sample_shape) if d is not None)
        self._dtype = np.dtype(schema.dtype)
        self._max_batch = schema.max_batch
        self._max_bytes = schema.max_bytes
        self._range = schema.value_range
        self._clip = schema.out_of_range == "clip"

    def __call__(self, x: Any) -> np.ndarray:
        """Return the array to feed the model, or raise ``SanitizerError``."""
        if isinstance(x, np.ndarray):
            arr = x if type(x) is np.ndarray else np.asarray(x)  # drop subclasses (memmap, matrix)
            if arr.nbytes > self._max_bytes:
                raise SanitizerError("bytes", f"input is {arr.nbytes} bytes, limit {self._max_bytes}")
            if arr.dtype != self._dtype:
                if arr.dtype.kind in "biufc":
                    raise SanitizerError("dtype", f"expected {self._dtype}, got {arr.dtype}")
                raise SanitizerError("not_numeric", f"array of {arr.dtype} is not numeric")
        elif isinstance(x, (list, tuple)):
            arr = self._from_nested(x)
        else:
            raise SanitizerError("not_numeric", f"expected an array or nested list of numbers, got {type(x).__name__}")

        if arr.ndim == self._ndim - 1:
            arr = arr[None]  # a single unbatched sample
        if arr.ndim != self._ndim:
            raise SanitizerError("shape", f"expected rank {self._ndim} [batch, {self._shape_str()}], got shape {arr.shape}")
        shape = arr.shape
        for axis, want in self._fixed:
            if shape[axis] != want:
                raise SanitizerError("shape", f"expected [batch, {self._shape_str()}], got {list(shape)}")
        n = shape[0]
        if n < 1 or n > self._max_batch:
            raise SanitizerError("batch_size", f"batch of {n}, allowed 1..{self._max_batch}")
        if arr.size == 0:  # a zero-length dynamic dim
            raise SanitizerError("shape", f"empty sample shape {list(shape)}")

        # The smallest and largest values expose NaN (argmin/argmax stop at the first NaN, as
        # min/max propagate it) and +-Inf, so they cover both checks. argmin/argmax: the same
        # values as min()/max() at a fraction of a ufunc reduction's set-up cost
        # (benchmarks/bench_guard_overhead.py, component rows).
        flat = arr.reshape(-1)
        lo_v, hi_v = float(flat[flat.argmin()]), float(flat[flat.argmax()])
        if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
            raise SanitizerError("non_finite", "input contains NaN or Inf")
        if self._range is not None:
            lo, hi = self._range
            if lo_v < lo or hi_v > hi:
                if not self._clip:
                    raise SanitizerError("range", f"values span [{lo_v:.6g}, {hi_v:.6g}], allowed [{lo:g}, {hi:g}]")
                arr = np.clip(arr, lo, hi, dtype=self._dtype)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return arr

    def _from_nested(self, x: list[Any] | tuple[Any, ...]) -> np.ndarray:
        """JSON-derived nested lists: numbers only (no bools, strings, nulls), rectangular."""
        try:
            raw = np.asarray(x)  # no dtype: numpy must not parse strings like "1.5" into floats
        except ValueError:
            raise SanitizerError("shape", "ragged nested list (rows of different lengths)") from None
        except (TypeError, OverflowError, RecursionError):
            raise SanitizerError("not_numeric", "nested list holds values that are not numbers") from None
        if raw.dtype.kind not in "iuf":
            what = {"b": "booleans", "U": "strings", "S": "bytes", "O": "non-numbers or ragged rows"}.get(
                raw.dtype.kind, str(raw.dtype)
            )
            raise SanitizerError("not_numeric", f"nested list holds {what}")
        if raw.size * self._dtype.itemsize > self._max_bytes:
            raise SanitizerError("bytes", f"input is {raw.size * self._dtype.itemsize} bytes, limit {self._max_bytes}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> Inf -> "non_finite" below
            return raw.astype(self._dtype, copy=False)

    def _shape_str(self) -> str:
        return ", ".join("?" if d is None else str(d) for d in self.sample_shape)
