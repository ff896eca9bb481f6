"""prefs: marketing preferences and unsubscribe links that keep a privacy policy's promises."""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import config
from .domain.tokens import Tokens
from .extensions import MigrationCommands, babel, db, limiter
from .mail.outbound import Mailer
from .ops import logs
from .store import configure_engine
from .web import i18n, oneclick, ratelimit


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Create and configure an instance of the Flask application."""
    app = Flask(
        __name__,
        instance_path=config.instance_path(),
        instance_relative_config=True,
        template_folder=str(config.ROOT / "templates"),
    )
    app.config.update(config.layered(app.instance_path))
    if test_config is not None:
        app.config.from_mapping(test_config)
    if not app.config.get("TESTING"):
        # before finish(), which may warn about a generated key
        logs.configure(config.log_level(app.config.get("LOG_LEVEL")))
    config.finish(app.config, app.instance_path)
    oneclick.install(app)
    if app.config["TRUSTED_PROXIES"]:
        # behind a load balancer: rate limits and fingerprints need the client's address
        hops = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]

    db.init_app(app)
    app.cli.add_command(MigrationCommands("db", help="Perform database migrations (Flask-Migrate)."))
    with app.app_context():
        configure_engine(db.engine, app.config["DB_BUSY_TIMEOUT_MS"])
    app.extensions["prefs.tokens"] = Tokens(app.config["SECRET_KEYS"], app.config["TOKEN_MAX_AGE"])
    app.extensions["prefs.mail"] = Mailer(app.config["SMTP_SERVER"], app.config["SMTP_TIMEOUT"])
    i18n.compile_catalogs()
    babel.init_app(
        app, locale_selector=i18n.select_locale, default_translation_directories=str(i18n.CATALOGS)
    )
    # memory:// without its thread-a-write expiry; Redis skipped while it is slow (ratelimit.py)
    app.config["RATELIMIT_STORAGE_URI"] = ratelimit.storage_uri(app.config["RATELIMIT_STORAGE_URI"])
    app.config["RATELIMIT_STORAGE_OPTIONS"] = ratelimit.storage_options(app.config["RATELIMIT_TIMEOUT_MS"])
    limiter.init_app(app)

    from . import cli, web

    web.register(app)
    cli.register(app)
    oneclick.ready(app)
    return app
