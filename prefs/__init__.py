"""prefs: marketing preferences and unsubscribe links that keep a privacy policy's promises."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask

from . import config, logs
from .db import configure_engine
from .extensions import db, migrate
from .tokens import Tokens

ROOT = Path(__file__).resolve().parent.parent


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Create and configure an instance of the Flask application."""
    app = Flask(
        __name__,
        instance_path=os.environ.get("PREFS_INSTANCE_PATH") or str(ROOT / "instance"),
        instance_relative_config=True,
        template_folder=str(ROOT / "templates"),
    )
    app.config.from_mapping(config.DEFAULTS)
    app.config.from_pyfile("prefs.cfg", silent=True)
    app.config.from_prefixed_env("PREFS")
    if test_config is not None:
        app.config.from_mapping(test_config)
    if not app.config.get("TESTING"):
        # before finish(), which may warn about a generated key
        logs.configure(config.log_level(app.config.get("LOG_LEVEL")))
    config.finish(app.config, app.instance_path)

    db.init_app(app)
    migrate.init_app(app, db)
    with app.app_context():
        configure_engine(db.engine, app.config["DB_BUSY_TIMEOUT_MS"])
    app.extensions["prefs.tokens"] = Tokens(app.config["SECRET_KEYS"], app.config["TOKEN_MAX_AGE"])

    from . import admin, cli, health, monitoring, web

    web.register(app)
    monitoring.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(admin.bp)
    cli.register(app)
    return app
