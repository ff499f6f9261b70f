"""Signed, encrypted model bundles (see docs/bundle-format.md)."""

from .keys import (
    Kek,
    generate_kek,
    generate_signing_keypair,
    load_kek,
    load_private_key,
    load_public_key,
    write_secret_file,
)
from .reader import OpenedBundle, inspect_bundle, open_bundle, verify_bundle
from .rollback import RollbackState
from .writer import build_bundle, write_bundle

__all__ = [
    "Kek", "OpenedBundle", "RollbackState", "build_bundle", "generate_kek",
    "generate_signing_keypair", "inspect_bundle", "load_kek", "load_private_key",
    "load_public_key", "open_bundle", "verify_bundle", "write_bundle", "write_secret_file",
]
