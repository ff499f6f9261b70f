"""Every way a fleet update is refused, as one ``BundleError`` subtype with a check name."""

from __future__ import annotations

from ..errors import BundleError


class UpdateError(BundleError):
    """The update source, its TUF metadata, the target or its attestation was refused.

    ``check`` names the failed check, e.g. ``tuf-expired`` (freeze), ``tuf-rollback``,
    ``tuf-signature`` (below threshold, revoked key), ``tuf-hash`` (wrong target bytes),
    ``attestation-signature``, ``attestation-subject``, ``attestation-verdict``.
    """

    check = "update"
