"""One exception family for every way a model bundle can be refused.

Callers that only want "is this bundle safe to run?" catch ``BundleError``;
callers that need to react differently (e.g. alert on tampering but retry on an
expired bundle) catch the subtype. Messages name the check that failed and never
contain key material or decrypted payload bytes.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "FormatError",
    "SignatureError",
    "TamperError",
    "BundleKeyError",
    "ExpiredError",
    "RollbackError",
    "ModelRejected",
]


class BundleError(Exception):
    """Base class: the bundle (or its model) must not be used.

    ``check`` is a short machine-readable name of the failed check
    (e.g. ``"signature"``, ``"chunk-auth"``); ``str(exc)`` is for humans.
    """

    check: str = "bundle"

    def __init__(self, message: str, *, check: str | None = None) -> None:
        super().__init__(message)
        if check is not None:
            self.check = check


class FormatError(BundleError):
    """Not a bundle we can parse: bad magic, unsupported version, bad lengths or JSON."""

    check = "format"


class SignatureError(BundleError):
    """The Ed25519 signature over header + manifest is missing, malformed or wrong."""

    check = "signature"


class TamperError(BundleError):
    """Signed metadata is fine but payload bytes are not: AEAD failure, digest
    mismatch, truncated/extended/reordered/swapped chunks."""

    check = "tamper"


class BundleKeyError(BundleError):
    """Key problem: wrong KEK, unreadable/malformed key file, permissions too wide."""

    check = "key"


class ExpiredError(BundleError):
    """The bundle's validity window has passed."""

    check = "expiry"


class RollbackError(BundleError):
    """The bundle version is older than one this device already accepted,
    or the anti-rollback state cannot be trusted."""

    check = "rollback"


class ModelRejected(BundleError):
    """The decrypted model failed an admission check (see ``reason``)."""

    check = "admission"

    def __init__(self, reason: str, *, check: str | None = None) -> None:
        super().__init__(f"model rejected: {reason}", check=check)
        self.reason = reason
