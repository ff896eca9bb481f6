"""Create the Flask extensions; ``create_app`` binds them with ``init_app``."""

from pathlib import Path
from typing import Any

import click
from flask import Flask
from flask.cli import ScriptInfo
from flask_babel import Babel
from flask_limiter import Limiter
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Session

from .models import Base

db = SQLAlchemy(model_class=Base)


MIGRATIONS = {
    "directory": str(Path(__file__).resolve().parent.parent / "migrations"),
    "render_as_batch": True,
    "compare_type": True,
}


def migrations(app: Flask) -> None:
    """Bind Flask-Migrate to ``app``, once; what ``flask db`` and ``upgrade()`` need.

    Flask-Migrate imports Alembic, 11 MB in every worker that never migrates anything, so
    it is imported here, when a migration is first asked for, not by ``create_app``.
    """
    if "migrate" not in app.extensions:
        from flask_migrate import Migrate

        Migrate(app, db, **MIGRATIONS)  # also puts its own ``db`` group on app.cli


class MigrationCommands(click.Command):
    """``flask db``: stands in for Flask-Migrate's command group until the command line runs it."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        app = (parent or click.get_current_context()).ensure_object(ScriptInfo).load_app()
        migrations(app)
        # Flask-Migrate's own group, options and subcommands, parsed as if it had been there
        return app.cli.commands["db"].make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        return ctx.command.invoke(ctx)


# limits are declared per route (public.py); storage comes from PREFS_RATELIMIT_STORAGE_URI.
# settings live here, not in app.config: Flask-Limiter keeps the first app's values anyway.
# swallow_errors: a storage outage must never turn a mailbox provider away
RATELIMIT_KEY_PREFIX = "prefs"


def _client_key() -> str:
    # a keyed hash of the client's address: the limiter's storage never holds a raw IP
    from .web.ratelimit import client_key  # ratelimit needs the models, which need this module

    return client_key()


limiter = Limiter(
    key_func=_client_key,
    key_prefix=RATELIMIT_KEY_PREFIX,
    strategy="fixed-window",
    headers_enabled=False,
    swallow_errors=True,
)
babel = Babel()


def session() -> Session:
    """Return this app context's database session, the one the surfaces pass to the domain."""
    return db.session()
