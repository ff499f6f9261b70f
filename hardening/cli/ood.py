"""CLI commands for this area (filled in by the issue that owns it)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add this area's commands to the main app and the audit group."""
