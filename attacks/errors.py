"""The release-time error family, rooted at the lowest release-time package.

``attacks`` raises these, and ``hardening`` re-exports them from ``hardening.errors``
(the same classes, not copies), so ``except hardening.errors.InputError`` still catches
what an attack adapter raises and the CLI maps them to exit code 2. ``hardening`` adds
``CheckFailed`` (exit 1), which only its audits and policies raise.
"""

from __future__ import annotations


class EdgewardError(Exception):
    """Base class; ``exit_code`` tells the CLI how to end."""

    exit_code = 2


class InputError(EdgewardError):
    """The user gave something we cannot use (file, option, array). Exit code 2."""


class ModelError(InputError):
    """The model file is unusable or unsafe to load."""


class DataError(InputError):
    """The data file is malformed or does not fit the model."""
