"""WSGI entry point for gunicorn (or any WSGI server), configured by environment.

    EDGEWARD_BUNDLE=model.ewb EDGEWARD_PUBLIC_KEY=pub.pem EDGEWARD_KEY_FILE=kek.key \\
    EDGEWARD_STORAGE_URI=redis://127.0.0.1:6379 \\
    gunicorn -w 4 -b 127.0.0.1:8080 'api.wsgi:app'

Optional: EDGEWARD_API_KEYS, EDGEWARD_ADMIN_TOKEN_FILE, EDGEWARD_ROLLBACK_STATE,
EDGEWARD_WATCH, EDGEWARD_KEK_ENV or EDGEWARD_PASSPHRASE_ENV (instead of
EDGEWARD_KEY_FILE). Each gunicorn
worker builds its own app (do not use --preload: onnxruntime must not be
forked after start-up).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .config import ApiConfig

if TYPE_CHECKING:
    from flask import Flask


def config_from_env(env: "os._Environ[str] | dict[str, str]" = os.environ) -> ApiConfig:
    return ApiConfig(
        bundle=env.get("EDGEWARD_BUNDLE"),
        public_key=env.get("EDGEWARD_PUBLIC_KEY"),
        kek_file=env.get("EDGEWARD_KEY_FILE"),
        kek_env=env.get("EDGEWARD_KEK_ENV"),
        passphrase_env=env.get("EDGEWARD_PASSPHRASE_ENV"),
        rollback_state=env.get("EDGEWARD_ROLLBACK_STATE"),
        storage_uri=env.get("EDGEWARD_STORAGE_URI", "memory://"),
        api_keys_file=env.get("EDGEWARD_API_KEYS"),
        admin_token_file=env.get("EDGEWARD_ADMIN_TOKEN_FILE"),
        watch_dir=env.get("EDGEWARD_WATCH"),
    )


def __getattr__(name: str) -> Flask:
    if name == "app":  # built on first access, i.e. inside each worker
        from .app import create_app

        app = create_app(config_from_env())
        globals()["app"] = app
        return app
    raise AttributeError(name)
