"""Which commands a device install (``pip install edgeward``, no extras) can run.

The device distribution carries only the runtime (numpy, onnx, onnxruntime, cryptography,
limits, flask); every other command is release-time analysis and needs the ``audit``
extra. The list of what that extra holds is read from the installed distribution's own
metadata, so it is defined once, in pyproject.toml.
"""

from __future__ import annotations

import re
from importlib import metadata

DEVICE_COMMANDS = frozenset({"serve", "verify", "inspect", "keygen", "api-key", "update", "device-key"})
AUDIT_INSTALL = "pip install torch==2.13.0 && pip install 'edgeward[audit]'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def missing_extra(extra: str = "audit", dist: str = "edgeward") -> list[str]:
    """Distributions of ``extra`` that are not installed ([] when edgeward itself is not
    installed as a distribution, e.g. run from a source tree: nothing to compare against)."""
    try:
        requires = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if f'extra == "{extra}"' not in marker.replace("'", '"'):
            continue
        m = _NAME.match(spec.strip())
        if m is None:
            continue
        try:
            metadata.version(m.group(0))
        except metadata.PackageNotFoundError:
            missing.append(m.group(0))
    return missing


def release_time_refusal(command: str) -> str | None:
    """The one-line refusal for ``command`` on a device install, or None when it can run."""
    if command in DEVICE_COMMANDS:
        return None
    missing = missing_extra()
    if not missing:
        return None
    return (f"'edgeward {command}' is a release-time command and needs edgeward[audit] "
            f"(missing: {', '.join(missing)}); install it with: {AUDIT_INSTALL}")


def version() -> str:
    try:
        return metadata.version("edgeward")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"
