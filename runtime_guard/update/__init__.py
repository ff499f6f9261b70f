"""Fleet updates on the device: TUF client, cohort selection, attestation checks, probation triggers.

``client`` needs the ``fleet`` extra (python-tuf); it is imported only when an update
source is configured, so a device install without the extra still serves local bundles.
``cohort``, ``attestation`` and ``triggers`` use only the runtime dependencies.
"""

from .errors import UpdateError

__all__ = ["UpdateError"]
