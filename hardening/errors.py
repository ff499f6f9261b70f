"""Errors the CLI maps to exit codes: input problems exit 2, failed checks exit 1."""

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


class CheckFailed(EdgewardError):
    """A policy or budget check failed. Exit code 1."""

    exit_code = 1
