"""Errors the CLI maps to exit codes: input problems exit 2, failed checks exit 1.

The input family is defined in ``attacks.errors`` (``attacks`` sits below ``hardening``
and raises it too) and re-exported here unchanged: one set of classes for both packages.
"""

from __future__ import annotations

from attacks.errors import DataError, EdgewardError, InputError, ModelError

__all__ = ["CheckFailed", "DataError", "EdgewardError", "InputError", "ModelError"]


class CheckFailed(EdgewardError):
    """A policy or budget check failed. Exit code 1."""

    exit_code = 1
