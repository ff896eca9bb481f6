"""Tune the engines and open write transactions that never deadlock on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

WRITE = "prefs_write"


def configure_engine(engine: Engine, busy_timeout_ms: int) -> None:
    """Set SQLite's pragmas on every connection and begin writes with BEGIN IMMEDIATE."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # take transaction control away from pysqlite, which would BEGIN lazily (deferred)
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged opt-out survives a power cut, not only a crash
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # a deferred transaction that reads and then writes cannot wait for the lock
        # (SQLITE_BUSY at once); taking it up front lets the busy timeout do its job
        if connection.get_execution_options().get(WRITE):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


@contextmanager
def write_transaction(session: Session) -> Iterator[Session]:
    """Run the block in one write transaction and commit it before returning."""
    if session.in_transaction():
        # end the read snapshot first: the write must begin as a write
        session.commit()
    session.connection(execution_options={WRITE: True})
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
