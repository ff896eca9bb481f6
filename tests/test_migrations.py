"""The migrations build the schema from nothing, and it matches the models."""

import os
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask_migrate import upgrade
from sqlalchemy import create_engine, inspect

from prefs import create_app
from prefs.extensions import Base, db, migrations, schema_objects
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
