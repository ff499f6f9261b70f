"""edgeward HTTP API: a Flask app factory over ``runtime_guard``.

``create_app(config)`` builds one app (see ``api.config.ApiConfig``);
``api.server.serve`` runs it under waitress, in one or several processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from .config import ApiConfig

__all__ = ["create_app", "ApiConfig"]


def create_app(config: "ApiConfig | dict[str, Any]") -> "Flask":
    from .app import create_app as _create_app

    return _create_app(config)


def __getattr__(name: str) -> Any:
    if name == "ApiConfig":
        from .config import ApiConfig

        return ApiConfig
    raise AttributeError(f"module 'api' has no attribute {name!r}")
