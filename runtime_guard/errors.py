"""One exception family for the device: everything ``runtime_guard`` raises on purpose.

``GuardError`` is the root; every member has a machine-readable ``check``::

    GuardError
    +-- LoadError             this deployment must not be served (load time)
    |   +-- BundleError       the bundle file: Format/Signature/Tamper/BundleKey/Expired/Rollback
    |   |   +-- ModelRejected     admission (and its DeadlineExceeded)
    |   +-- GuardConfigError  the signed runtime config       (also a ValueError)
    |   +-- AnomalyFormatError  the detector arrays / JSON    (also a ValueError)
    |   +-- GoldenSetError    the signed golden smoke set      (also a ValueError)
    |   +-- PartsMismatch     model, config and detectors do not fit together (ValueError)
    +-- RequestError          one request cannot be served (request time)
        +-- SanitizerError    the input schema (becomes a ``rejected`` verdict)  (ValueError)
        +-- AnomalyInputError arrays handed to the scorer directly             (ValueError)
        +-- InvalidClientId   ``predict`` got an unusable client id            (ValueError)
        +-- StorageUnavailable  the rate-limit storage is down; fail closed (RuntimeError)

Callers that only want "can this be served?" catch ``LoadError``; those that react
differently (alert on tampering, retry an expired bundle) catch the subtype. The
``ValueError``/``RuntimeError`` mixins keep older ``except ValueError`` callers working.
Messages name the check that failed and never contain key material or payload bytes.
"""

from __future__ import annotations

__all__ = [
    "GuardError",
    "LoadError",
    "RequestError",
    "PartsMismatch",
    "InvalidClientId",
    "BundleError",
    "FormatError",
    "SignatureError",
    "TamperError",
    "BundleKeyError",
    "ExpiredError",
    "RollbackError",
    "ModelRejected",
]


class GuardError(Exception):
    """Root of the device's exceptions.

    ``check`` is a short machine-readable name of the failed check
    (e.g. ``"signature"``, ``"chunk-auth"``); ``str(exc)`` is for humans.
    """

    check: str = "guard"

    def __init__(self, message: str, *, check: str | None = None) -> None:
        super().__init__(message)
        if check is not None:
            self.check = check


class LoadError(GuardError):
    """Load time: the bundle, its model, config or detectors must not be served."""

    check = "load"


class RequestError(GuardError):
    """Request time: this one request cannot be served as asked."""

    check = "request"


class PartsMismatch(LoadError, ValueError):
    """Model, runtime config and detectors are each valid but do not fit together
    (a gate without detectors, detectors that need an output the model lacks, a
    model whose smoke output is not finite [1, C] logits)."""

    check = "parts"


class InvalidClientId(RequestError, ValueError):
    """``predict`` was given a client id that is not a short non-empty string."""

    check = "client-id"


class BundleError(LoadError):
    """The bundle (or its model) must not be used."""

    check = "bundle"


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
