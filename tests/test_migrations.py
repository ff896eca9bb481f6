"""The migrations build the schema from nothing, and it matches the models."""

import os
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import downgrade, upgrade
from sqlalchemy import create_engine, inspect, text

from prefs import create_app
from prefs.extensions import db, migrations
from prefs.models import Base, schema_objects
from tests.conftest import SERVER_URL, drop_postgresql_database, fresh_postgresql_database

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def test_upgrade_from_nothing_has_no_drift(tmp_path):
    if SERVER_URL:
        url = fresh_postgresql_database(SERVER_URL, "prefs_migrations")
    else:
        url = f"sqlite:///{tmp_path / 'migrated.sqlite3'}"
    try:
        app = create_app(
            {"SECRET_KEYS": "k" * 20, "DATABASE_URL": url, "BASE_URL": "https://prefs.example.com"}
        )
        migrations(app)
        with app.app_context():
            upgrade(directory=str(MIGRATIONS))
            engine = db.engine
            tables = set(inspect(engine).get_table_names())
            assert {t.name for t in Base.metadata.sorted_tables} <= tables
            with engine.connect() as conn:
                opts = {"compare_type": True, "include_object": schema_objects(engine.dialect.name)}
                context = MigrationContext.configure(conn, opts=opts)
                assert compare_metadata(context, Base.metadata) == []
            db.engine.dispose()
    finally:
        if SERVER_URL:
            drop_postgresql_database(url)


def test_the_cli_upgrade_command_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    app = create_app({"SECRET_KEYS": "k" * 20, "DATABASE_URL": url, "BASE_URL": "https://prefs.example.com"})
    result = app.test_cli_runner().invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    engine = create_engine(url)
    assert "subscribers" in inspect(engine).get_table_names()
    engine.dispose()
    assert os.path.exists(tmp_path / "cli.sqlite3")


def test_serving_never_loads_alembic():
    # Flask-Migrate imports Alembic, 11 MB a worker; only a migration command loads it
    import subprocess
    import sys

    code = (
        "import sys; from prefs import create_app; "
        "app = create_app({'SECRET_KEYS': 'k' * 20, 'DATABASE_URL': 'sqlite://', "
        "'BASE_URL': 'http://localhost'}); "
        "app.test_client().get('/healthz'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'flask_migrate')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]", out.stdout + out.stderr


# news: a left it, b left all (complained) after choosing it, c by default; tips (opt-in):
# b chose it after leaving all
ON_FILE = (
    "INSERT INTO topics (id, key, name, description, opt_in, archived, created_at)"
    " VALUES (1, 'news', 'News', '', false, false, :now), (2, 'tips', 'Tips', '', true, false, :now)",
    "INSERT INTO subscribers (id, public_id, email, created_at, version, left_all_reason, left_all_version)"
    " VALUES (1, 'a', 'a@example.com', :now, 3, NULL, NULL),"
    " (2, 'b', 'b@example.com', :now, 5, 'complained', 4),"
    " (3, 'c', 'c@example.com', :now, 1, NULL, NULL)",
    "INSERT INTO preferences (subscriber_id, topic_id, subscribed, version, source, updated_at)"
    " VALUES (1, 1, false, 2, 'page', :now), (2, 2, true, 5, 'page', :now), (2, 1, true, 3, 'page', :now)",
    "INSERT INTO events (txid, subscriber_id, topic_id, action, source, campaign, created_at)"
    " VALUES (0, 1, 1, 'unsubscribe', 'page', 'c1', :now), (0, 2, NULL, 'unsubscribe', 'api', NULL, :now),"
    " (0, 2, 2, 'resubscribe', 'page', 'c1', :now)",
)


def _triggers(engine):
    """Return the trigger and function definitions the database holds."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return sorted(
                conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")).all()
            )
        triggers = conn.execute(
            text(
                "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
                " WHERE NOT tgisinternal"
                " AND tgrelid::regclass::text IN ('subscribers', 'preferences', 'events')"
            )
        ).all()
        functions = conn.execute(
            text("SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'prefs\\_%'")
        ).all()
        return sorted(triggers) + sorted(functions)


def test_the_running_counts_migration_counts_what_is_on_file(tmp_path):
    if SERVER_URL:
        url = fresh_postgresql_database(SERVER_URL, "prefs_migrations")
        built = fresh_postgresql_database(SERVER_URL, "prefs_migrations")
    else:
        url = f"sqlite:///{tmp_path / 'counted.sqlite3'}"
        built = f"sqlite:///{tmp_path / 'built.sqlite3'}"
    try:
        app = create_app(
            {"SECRET_KEYS": "k" * 20, "DATABASE_URL": url, "BASE_URL": "https://prefs.example.com"}
        )
        migrations(app)
        with app.app_context():
            upgrade(directory=str(MIGRATIONS), revision="1d3a907e4c21")
            engine = db.engine
            with engine.begin() as conn:
                for statement in ON_FILE:
                    conn.execute(text(statement), {"now": "2026-11-20 10:00:00+00:00"})
            upgrade(directory=str(MIGRATIONS))
            from prefs.domain import overview
            from tests.tables import counts, recounted

            session = db.session()
            assert counts(session) == recounted(session) != {}
            figures = {a.key: (a.receiving, a.chose, a.left) for a in overview.audiences(session)}
            assert figures == {"news": (1, 1, 1), "tips": (1, 1, 0)}
            session.close()
            migrated = _triggers(engine)
            downgrade(directory=str(MIGRATIONS), revision="1d3a907e4c21")
            assert _triggers(engine) == []
            db.engine.dispose()
        built_engine = create_engine(built)
        Base.metadata.create_all(built_engine)
        assert _triggers(built_engine) == migrated
        built_engine.dispose()
    finally:
        if SERVER_URL:
            drop_postgresql_database(url)
            drop_postgresql_database(built)
