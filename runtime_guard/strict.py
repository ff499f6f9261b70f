"""Strict parsing of configuration: the one way edgeward reads a config document.

Used by the signed runtime policy (``runtime_guard.config``) and the release policy
(``hardening.report.policy``). Unknown keys, wrong types and out-of-range values are
refused naming the field, because a typo that silently disables a check is worse than
a refused config. Every function takes ``fail(path, message) -> Exception`` first, so
each caller refuses with its own domain's exception (bind it with ``functools.partial``).
Booleans are not numbers here, and numbers must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Fail", "boolean", "choice", "integer", "mapping", "number", "string", "strings"]

Fail = Callable[[str, str], Exception]


def mapping(fail: Fail, path: str, d: Any, known: Iterable[str]) -> dict[str, Any]:
    """``d`` as a dict whose keys are all in ``known`` (``None`` reads as empty)."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise fail(path, "must be an object")
    allowed = list(known)
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise fail(path, f"unknown key(s) {unknown}; known: {', '.join(allowed)}")
    return d


def _integer_range(lo: int, hi: int | None) -> str:
    if hi is None:
        return {0: "a non-negative integer", 1: "a positive integer"}.get(lo, f"an integer >= {lo}")
    return f"an integer in {lo}..{hi}"


def integer(fail: Fail, path: str, v: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise fail(path, f"must be {_integer_range(lo, hi)}, got {v!r}")
    return v


def number(fail: Fail, path: str, v: Any, lo: float = -math.inf, hi: float = math.inf, *,
           open_lo: bool = False) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise fail(path, f"must be a finite number, got {v!r}")
    if v < lo or v > hi or (open_lo and v == lo):
        if (lo, hi, open_lo) == (0, 1, False):
            raise fail(path, f"must be a fraction in [0, 1], got {v}")
        if hi == math.inf and not open_lo:
            raise fail(path, f"must not be negative, got {v}" if lo == 0 else f"must be >= {lo}, got {v}")
        raise fail(path, f"must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}")
    return float(v)


def choice(fail: Fail, path: str, v: Any, options: Iterable[str]) -> str:
    allowed = tuple(options)
    if v not in allowed:
        raise fail(path, f"must be one of {list(allowed)}, got {v!r}")
    return str(v)


def boolean(fail: Fail, path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise fail(path, f"must be true or false, got {v!r}")
    return v


def string(fail: Fail, path: str, v: Any) -> str:
    if not isinstance(v, str):
        raise fail(path, f"must be a string, got {v!r}")
    return v


def strings(fail: Fail, path: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise fail(path, "must be a list of strings")
    return list(v)
