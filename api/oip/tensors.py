"""OIP tensors <-> numpy, refusing anything ambiguous.

JSON ``data`` is flat row-major or nested exactly as ``shape``; binary data
(the binary tensor data extension, also gRPC ``raw_input_contents``) is the
raw little-endian row-major bytes of the tensor, exactly
``prod(shape) * itemsize`` of them. Every numeric OIP datatype is accepted
and checked exactly, then converted to the guard's float32 schema; values
that float32 cannot hold are refused, never clipped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..body import MAX_ELEMENTS, bad_body

OIP_DTYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
MAX_RANK = 8


def wire_dtype(datatype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype of an OIP datatype (the extension's byte order)."""
    return np.dtype(OIP_DTYPES[datatype]).newbyteorder("<")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_header(name: object, shape: object, datatype: object, input_name: str) -> tuple[list[int], str]:
    """Name, shape and datatype of an input tensor; returns (shape, datatype)."""
    if not isinstance(name, str):
        raise bad_body("input tensor needs a string name", "oip-name")
    if name != input_name:
        raise bad_body(f"unknown input tensor {name[:64]!r}; the model's input is {input_name!r}", "oip-name")
    if (not isinstance(shape, list) or not shape or len(shape) > MAX_RANK
            or not all(_is_int(s) and 0 < s <= 1 << 24 for s in shape)):
        raise bad_body("shape must be a list of 1 to 8 positive integers", "oip-shape")
    if not isinstance(datatype, str) or datatype not in OIP_DTYPES:
        raise bad_body(f"datatype must be one of {sorted(OIP_DTYPES)}", "oip-datatype")
    if math.prod(shape) > MAX_ELEMENTS:
        raise bad_body("tensor has too many elements", "oip-shape")
    return shape, datatype


def leaves(data: list[Any], shape: list[int]) -> list[Any]:
    """The row-major elements of ``data``: flat (exactly prod(shape) items) or nested
    exactly as ``shape`` (every level a list of the right length, leaves at the last
    level). Anything in between is refused, not silently flattened."""
    total = math.prod(shape)
    if not data or not isinstance(data[0], list):
        if len(data) != total:
            raise bad_body(f"data has {len(data)} elements, shape {shape} needs {total}", "oip-shape")
        if any(isinstance(v, list) for v in data):
            raise bad_body("data mixes lists and scalars", "oip-shape")
        return data
    out: list[Any] = []
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if depth == len(shape):
            if isinstance(node, list):
                raise bad_body(f"data nests deeper than shape {shape}", "oip-shape")
            out.append(node)
            continue
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise bad_body(f"nested data does not match shape {shape} at depth {depth}", "oip-shape")
        stack.extend((child, depth + 1) for child in reversed(node))
    return out


def typed_array(flat: list[Any], dtype: str) -> np.ndarray:
    """Exact element checks for ``dtype``: integer types take JSON integers only, range
    checked on Python ints (no float64 round trip: 2**64-1 stays 2**64-1, and 2**64 is
    refused); float types take finite numbers within the type's range."""
    target: np.dtype[Any] = np.dtype(OIP_DTYPES[dtype])
    if target.kind in "iu":
        info = np.iinfo(target)
        lo, hi = int(info.min), int(info.max)
        for v in flat:
            if not _is_int(v):
                raise bad_body(f"{dtype} data must be JSON integers", "oip-datatype")
            if not lo <= v <= hi:
                raise bad_body(f"value {v} is outside the {dtype} range [{lo}, {hi}]", "oip-datatype")
        return np.array(flat, dtype=target)
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad_body(f"{dtype} data must be JSON numbers", "json-type")
    try:
        wide = np.array(flat, dtype=np.float64)
    except OverflowError:  # an integer past float64
        raise bad_body(f"data is outside the {dtype} range", "oip-datatype") from None
    with np.errstate(over="ignore", invalid="ignore"):
        arr = wide.astype(target)
    if not np.all(np.isfinite(arr)):
        raise bad_body(f"data must be finite numbers within the {dtype} range", "oip-datatype")
    return arr


def from_raw(raw: bytes | memoryview, shape: list[int], datatype: str) -> np.ndarray:
    """Binary tensor data -> array: exactly the bytes the shape and datatype need."""
    dt = wire_dtype(datatype)
    need = math.prod(shape) * dt.itemsize
    if len(raw) != need:
        raise bad_body(f"binary data has {len(raw)} bytes; shape {shape} of {datatype} needs {need}",
                       "oip-binary")
    arr = np.frombuffer(raw, dtype=dt).reshape(shape)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise bad_body("binary data must be finite numbers", "oip-datatype")
    return arr


def to_model_input(arr: np.ndarray) -> np.ndarray:
    """The guard's float32 schema; values float32 cannot hold are refused."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise bad_body("data is outside the float32 range the model takes", "oip-datatype")
    return out


def to_raw(arr: np.ndarray, datatype: str) -> bytes:
    """Array -> binary tensor data (little-endian, row-major)."""
    return np.ascontiguousarray(arr, dtype=wire_dtype(datatype)).tobytes()
