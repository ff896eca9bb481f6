"""Tune the engines and open write transactions that never deadlock on SQLite."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

WRITE = "prefs_write"


class WriteGate:
    """Queue a SQLite database's writers, in this process and across processes.

    SQLite's busy handler makes a waiting writer sleep in growing steps (up to 100 ms)
    while the lock may have been free for most of that time; with dozens of gunicorn
    threads that turns a one-millisecond commit into a queue of sleepers. Waiters here
    take a thread lock, then an ``flock`` on a file beside the database, and go the
    moment it is released.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._path = path + ".write-lock"
        self._fd: int | None = None
        self._pid = 0

    def _file(self) -> int:
        # a forked worker must not share its parent's open file: flock is per open file
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the gate for one write transaction, or raise after the busy timeout."""
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise _busy()
        try:
            fd = self._file()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise _busy() from None
                    time.sleep(0.0005)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


def _busy() -> OperationalError:
    return OperationalError("BEGIN IMMEDIATE", None, TimeoutError("the database is busy"))


_gates: weakref.WeakKeyDictionary[Engine, WriteGate] = weakref.WeakKeyDictionary()


def configure_engine(engine: Engine, busy_timeout_ms: int) -> None:
    """Set SQLite's pragmas on every connection and begin writes with BEGIN IMMEDIATE."""
    if engine.dialect.name != "sqlite":
        return
    if engine.url.database and engine.url.database != ":memory:":
        _gates[engine] = WriteGate(engine.url.database, busy_timeout_ms / 1000)

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
    """Run the block in one write transaction and commit it before returning.

    Called inside another write transaction, the block joins it: the outer one commits.
    """
    if session.info.get(WRITE):
        yield session
        return
    if session.in_transaction():
        # end the read snapshot first: the write must begin as a write
        session.commit()
    gate = _gates.get(session.get_bind().engine)
    if gate is None:
        with _transaction(session):
            yield session
        return
    with gate.held(), _transaction(session):
        yield session


@contextmanager
def _transaction(session: Session) -> Iterator[None]:
    session.connection(execution_options={WRITE: True})
    session.info[WRITE] = True
    try:
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.info.pop(WRITE, None)


def driver_rows(session: Session, sql: str, params: Any) -> list[Any]:
    """Run one read on the session's connection with the driver's own cursor; return its rows.

    The bulk reads use this to skip SQLAlchemy's per-row processing. The driver's errors
    are turned into SQLAlchemy's, as every other statement's are, and a lost connection is
    invalidated, so a database outage answers 503 here too and the pool recovers.
    """
    connection = session.connection()
    dbapi_connection = connection.connection
    driver_error = connection.dialect.loaded_dbapi.Error
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, params)
        return list(cursor.fetchall())
    except driver_error as err:
        lost = connection.dialect.is_disconnect(err, dbapi_connection, cursor)
        if lost:
            connection.invalidate(err)
        raise DBAPIError.instance(
            sql,
            params,
            err,
            driver_error,
            # the parameters are addresses: keep them out of the message, as the engine does
            hide_parameters=connection.engine.hide_parameters,
            connection_invalidated=lost,
        ) from err
    finally:
        # on a lost connection closing fails too; the error above already says so
        with contextlib.suppress(driver_error):
            cursor.close()
