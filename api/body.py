"""Predict request bodies -> numpy arrays, refusing anything ambiguous.

Two encodings:
* ``application/json``: ``{"inputs": <nested numeric lists>}``. Leaves must be
  JSON numbers (no booleans, strings, null or NaN/Infinity spellings) and the
  nesting must be rectangular. Values become float32 (JSON carries no dtype).
* ``application/x-npy``: one ``.npy`` file. The header is checked *before*
  any allocation (numeric dtype, declared size equals the bytes sent) and the
  array is read with ``np.load(allow_pickle=False)`` from memory.

Size is capped per request (the app's ``MAX_CONTENT_LENGTH`` unless a route asks for less),
declared and chunked bodies alike: a declared length is checked before anything is read,
a chunked body through Werkzeug's ``request.max_content_length`` (``read_body``).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from flask import Request
from numpy.lib import format as npy_format
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from .problems import ApiProblem

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy", "application/octet-stream+npy")
MAX_JSON_DEPTH = 8
MAX_ELEMENTS = 1 << 22  # hard ceiling on elements regardless of byte size


def bad_body(detail: str, check: str = "body") -> ApiProblem:
    return ApiProblem(400, "invalid-body", "Invalid request body", detail, extra={"check": check})


def unsupported_type(got: str) -> ApiProblem:
    return ApiProblem(415, "unsupported-media-type", "Unsupported Media Type",
                      f"content type {got or '(none)'!r} is not accepted; use application/json "
                      "or application/x-npy")


def media_type(req: Request) -> str:
    """``type/subtype`` of the body, lower case."""
    return req.mimetype


def _too_large(max_bytes: int) -> ApiProblem:
    return ApiProblem(413, "payload-too-large", "Payload Too Large", f"body is over the {max_bytes}-byte limit")


def read_body(req: Request, max_bytes: int) -> bytes:
    """Raw body, at most ``max_bytes`` (413 past it, declared or chunked).

    A declared ``Content-Length`` within the cap is read as exactly that many bytes from
    ``request.input_stream`` (WSGI's own contract for a declared length; a shorter body is
    Werkzeug's ``ClientDisconnected``, as its guarded stream would raise). Werkzeug's
    ``request.stream`` would check the same things again through a ``LimitedStream``
    built per request, several microseconds on a small body (benchmarks/bench_api.py).

    A chunked body goes through ``request.stream`` under a per-request
    ``max_content_length`` set one byte past the cap: Werkzeug's stream stops quietly at
    the limit, so reading that extra byte is what shows the body was longer. With no
    length and a server that does not terminate input, the stream is empty (Werkzeug's
    safe fallback)."""
    n = req.content_length
    if n is not None:
        if n > max_bytes:
            raise _too_large(max_bytes)
        data: bytes = req.input_stream.read(n)
        if len(data) != n:
            raise ClientDisconnected()
        return data
    req.max_content_length = max_bytes + 1
    try:
        data = req.stream.read()
    except RequestEntityTooLarge:
        raise _too_large(max_bytes) from None
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# One decoder for the process: ``json.loads(..., parse_constant=...)`` builds a new
# JSONDecoder (and scanner) on every call, which is measurable per request.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json_document(data: bytes) -> Any:
    if not data:
        raise bad_body("empty body", "json")
    try:
        return _DECODER.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad_body("body is not valid UTF-8 JSON", "json") from None


def _check_numeric_tree(obj: Any) -> None:
    """Leaves must be int/float (not bool); depth bounded; lists non-empty."""
    stack = [(obj, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, list):
            if depth >= MAX_JSON_DEPTH:
                raise bad_body(f"inputs nest deeper than {MAX_JSON_DEPTH} levels", "json-shape")
            if not node:
                raise bad_body("inputs contain an empty list", "json-shape")
            stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, bool) or not isinstance(node, (int, float)):
            raise bad_body("inputs must contain only numbers", "json-type")
        else:
            count += 1
            if count > MAX_ELEMENTS:
                raise bad_body("inputs have too many elements", "json-shape")
            if isinstance(node, float) and not math.isfinite(node):
                raise bad_body("inputs must be finite numbers", "json-type")


def _fast_array(inputs: list[Any], data: bytes) -> np.ndarray | None:
    """Common case in one numpy call: a rectangular list of plain numbers, as float32.

    Only taken when the body's only string is the ``"inputs"`` key (two quote
    characters: no string anywhere that numpy could parse as a number) and it
    has no ``true``/``false``/``null`` token (numpy would turn booleans into
    numbers); ragged rows raise. Anything else goes the slow, exact way so the
    error names the problem. Overflow gives Inf, which the caller refuses."""
    if data.count(b'"') != 2 or b"true" in data or b"false" in data or b"null" in data:
        return None
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.array(inputs, dtype=np.float32)
    except (ValueError, OverflowError, TypeError, RecursionError):
        return None
    if out.size == 0 or out.ndim > MAX_JSON_DEPTH or out.size > MAX_ELEMENTS:
        return None
    return out


def json_to_array(inputs: Any, data: bytes = b"null") -> np.ndarray:
    if not isinstance(inputs, list):
        raise bad_body("'inputs' must be a (nested) list of numbers", "json-type")
    out = _fast_array(inputs, data)
    if out is None:
        _check_numeric_tree(inputs)
        try:
            arr = np.array(inputs, dtype=np.float64)
        except OverflowError:
            raise bad_body("inputs must be finite numbers", "json-type") from None
        except (ValueError, TypeError):
            raise bad_body("inputs are not a rectangular array of numbers", "json-shape") from None
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(np.float32)
    # huge integers / floats past the float32 range are Inf now; one float64 sum shows any
    if not math.isfinite(float(out.sum(dtype=np.float64))):
        raise bad_body("inputs must be finite numbers within the float32 range", "json-type")
    return out


def parse_json_inputs(data: bytes) -> np.ndarray:
    doc = parse_json_document(data)
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise bad_body("body must be a JSON object with an 'inputs' member", "json")
    return json_to_array(doc["inputs"], data)


def parse_npy(data: bytes) -> np.ndarray:
    """Validate the .npy header, then np.load without pickle."""
    bio = io.BytesIO(data)
    try:
        version = npy_format.read_magic(bio)
        if version == (1, 0):
            shape, _fortran, dtype = npy_format.read_array_header_1_0(bio)
        elif version == (2, 0):
            shape, _fortran, dtype = npy_format.read_array_header_2_0(bio)
        else:
            raise ValueError("unsupported .npy version")
    except (ValueError, EOFError, SyntaxError, TypeError, OverflowError):
        raise bad_body("body is not a valid .npy file", "npy") from None
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise bad_body(f"dtype {dtype.str} is not a plain numeric dtype", "npy-dtype")
    if len(shape) == 0:
        raise bad_body("inputs must be an array, not a scalar", "npy-shape")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise bad_body("inputs have too many elements", "npy-shape")
    if count * dtype.itemsize != len(data) - bio.tell():
        raise bad_body("declared .npy shape does not match the bytes sent", "npy-shape")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError, TypeError):
        raise bad_body("body is not a valid .npy file", "npy") from None
    return np.ascontiguousarray(arr)


def parse_predict_body(req: Request, max_bytes: int) -> np.ndarray:
    """Array from a /v1/predict request (raises ApiProblem 400/413/415)."""
    mt = media_type(req)
    if mt not in JSON_TYPES and mt not in NPY_TYPES:
        raise unsupported_type(mt)
    data = read_body(req, max_bytes)
    return parse_json_inputs(data) if mt in JSON_TYPES else parse_npy(data)


def encode_npy(arr: np.ndarray) -> bytes:
    """Client helper / tests: array -> .npy bytes (no pickle)."""
    bio = io.BytesIO()
    np.save(bio, np.asarray(arr), allow_pickle=False)
    return bio.getvalue()
