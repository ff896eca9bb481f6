"""Give every test a fresh app and database: SQLite by default, PostgreSQL when asked.

Set ``PREFS_TEST_DATABASE_URL`` (for example
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) to run the suite on that server:
the run makes a database of its own there and drops it afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, has_app_context
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.orm import Session

from prefs import create_app
from prefs.domain import privacy
from prefs.extensions import db
from prefs.models import Base

TEST_KEYS = ["test-signing-key-0123456789abcdef"]


class Client(FlaskClient):
    """A test client whose requests come from outside the test's own database session.

    A one-click commits on a connection of its own, as it does in production; a test that
    shares an app context with the request then ends its read after each request (unless it
    has changes of its own pending), as another process's reader would, and sees that commit.
    """

    def open(self, *args: Any, **kwargs: Any) -> Any:
        response = super().open(*args, **kwargs)
        if has_app_context():
            session = db.session()
            if not (session.new or session.dirty or session.deleted):
                session.rollback()
        return response


SERVER_URL = os.environ.get("PREFS_TEST_DATABASE_URL")
_EMPTY = ""  # the statements that empty the run's database, made once


def fresh_postgresql_database(server_url: str, prefix: str) -> str:
    """Create an empty database on the server and return its URL."""
    url = make_url(server_url).set(drivername="postgresql+psycopg")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_postgresql_database(database_url: str) -> None:
    """Drop a database made by ``fresh_postgresql_database``."""
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def server_database() -> Iterator[str | None]:
    """Return the run's own PostgreSQL database with the schema built, or None for SQLite."""
    if not SERVER_URL:
        yield None
        return
    url = fresh_postgresql_database(SERVER_URL, "prefs_test")
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        # the run's own database is never crashed: the tests that stop or kill PostgreSQL run
        # clusters of their own, whose commits stay durable; here a commit need not wait for
        # the disk
        conn.execute(text(f'ALTER DATABASE "{make_url(url).database}" SET synchronous_commit = off'))
    engine.dispose()
    yield url
    drop_postgresql_database(url)


def emptied(database_url: str) -> str:
    """Return the statements that empty every table and restart every sequence of the schema.

    Rows are deleted with triggers and foreign keys off (``replica``): a test leaves a few rows
    in a few tables, and TRUNCATE makes new files for every table whatever it holds.
    """
    engine = create_engine(database_url)
    with engine.connect() as conn:
        named = "quote_ident(sequence_schema) || '.' || quote_ident(sequence_name)"
        sequences = conn.execute(text(f"SELECT {named} FROM information_schema.sequences")).scalars().all()
    engine.dispose()
    deletes = " ".join(f'DELETE FROM "{t.name}";' for t in reversed(Base.metadata.sorted_tables))
    restarts = " ".join(f"SELECT setval('{name}', 1, false);" for name in sequences)
    return f"SET LOCAL session_replication_role = replica; {deletes} {restarts}"


@pytest.fixture
def database_url(server_database: str | None, tmp_path: Any) -> Iterator[str]:
    """Return an empty database for one test."""
    privacy.forget_cached_keys()
    if server_database is None:
        yield f"sqlite:///{tmp_path / 'prefs.sqlite3'}"
        return
    global _EMPTY
    _EMPTY = _EMPTY or emptied(server_database)
    engine = create_engine(server_database)
    with engine.begin() as conn:
        conn.exec_driver_sql(_EMPTY)
    engine.dispose()
    yield server_database


@pytest.fixture
def make_app(database_url: str, tmp_path: Any) -> Iterator[Callable[..., Flask]]:
    """Return a factory of apps on the test's database; settings override the defaults."""
    made: list[Flask] = []

    def make(**settings: Any) -> Flask:
        config = {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEYS": TEST_KEYS,
            "BASE_URL": "https://prefs.example.com",
            # the test client's own Host, and the loopback servers'; links still start with the base URL
            "TRUSTED_HOSTS": ["localhost", "127.0.0.1"],
            # the address form's timing floor; tests that measure it set their own
            "REQUEST_MIN_SECONDS": 0,
        }
        config.update(settings)
        app = create_app(config)
        app.test_client_class = Client
        with app.app_context():
            db.create_all()
        made.append(app)
        return app

    os.environ["PREFS_INSTANCE_PATH"] = str(tmp_path / "instance")
    yield make
    del os.environ["PREFS_INSTANCE_PATH"]
    for app in made:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Iterator[Flask]:
    """Return the app, inside an app context."""
    app = make_app()
    with app.app_context():
        yield app


@pytest.fixture
def session(app: Flask) -> Session:
    """Return the app's database session."""
    return db.session()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    """Run a real SMTP server on loopback for one test and return it."""
    from tests.smtp import LoopbackSMTP

    server = LoopbackSMTP()
    yield server
    server.stop()
