"""The driver's own connections and statements: named parameters, compiled once per dialect."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Dialect, Engine
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from .gate import WRITER_LOCK, busy_timeout_ms
from .transactions import sqlalchemy_error


class DriverTransaction:
    """One write transaction on a driver connection: what a group commit's changes run in.

    It offers what the statements of a single change use, as a session does: the engine
    (``get_bind``) and ``info``, where notes wait for the commit (``metrics.count_change``).
    The driver's errors are turned into SQLAlchemy's, so an outage answers 503 as anywhere.
    """

    __slots__ = ("connection", "cursor", "engine", "info", "lost")

    def __init__(self, engine: Engine, connection: Any) -> None:
        self.engine = engine
        self.connection = connection
        self.cursor: Any = None
        self.info: dict[str, Any] = {}
        self.lost = False

    def get_bind(self) -> Engine:
        return self.engine

    def begin(self) -> None:
        with self._translated("BEGIN", None):
            self.cursor = self.connection.cursor()
            if self.engine.dialect.name == "sqlite":
                self.cursor.execute("BEGIN IMMEDIATE")  # pysqlite is told not to begin itself
            else:
                self.cursor.execute(WRITER_LOCK)  # psycopg begins the transaction here

    def execute(self, sql: str, params: Any = None) -> Any:
        """Run one statement; return the cursor, to read its rows."""
        with self._translated(sql, params):
            if params is None:
                self.cursor.execute(sql)
            else:
                self.cursor.execute(sql, params)
        return self.cursor

    def commit(self) -> None:
        with self._translated("COMMIT", None):
            self.connection.commit()

    def rollback(self) -> None:
        """Roll back, if the connection still can: a lost one has nothing left to undo."""
        with contextlib.suppress(self.engine.dialect.loaded_dbapi.Error):
            self.connection.rollback()

    @contextmanager
    def _translated(self, sql: str, params: Any) -> Iterator[None]:
        driver_error = self.engine.dialect.loaded_dbapi.Error
        try:
            yield
        except driver_error as err:
            self.lost = self.lost or self.engine.dialect.is_disconnect(err, self.connection, self.cursor)
            raise sqlalchemy_error(self.engine, sql, params, err, self.lost) from err


# what a single change's statements run in: a caller's session, or a group commit's transaction
Writer = Session | DriverTransaction


# how long a group's connection waits for a row lock before the change that needs it is
# taken out of the group and tried alone (a group commits in a few milliseconds)
GROUP_LOCK_WAIT_MS = 100


class OwnConnection:
    """A driver connection of one group commit's, in one process, outside the engine's pool.

    Taken from the pool and detached from it, so the pool keeps its size for everyone
    else, and kept: a group needs no checkout, ping or session around it.
    """

    def __init__(self) -> None:
        self._connection: Any = None
        self._pid = 0
        self.fresh = True

    def get(self, engine: Engine) -> Any:
        # a forked worker must not use its parent's connection (nor close it for the parent)
        if self._connection is None or self._pid != os.getpid():
            driver_error = engine.dialect.loaded_dbapi.Error
            try:
                pooled = engine.raw_connection()
            except driver_error as err:  # unreachable: an outage, as the session's checkout says
                raise sqlalchemy_error(engine, None, None, err) from err
            self._connection, self._pid, self.fresh = pooled.dbapi_connection, os.getpid(), True
            pooled.detach()
            if engine.dialect.name == "postgresql":
                self._wait_briefly(engine)
        else:
            self.fresh = False
        return self._connection

    def _wait_briefly(self, engine: Engine) -> None:
        """Make this connection give up on a lock after ``GROUP_LOCK_WAIT_MS`` (at most the busy timeout)."""
        wait = min(GROUP_LOCK_WAIT_MS, busy_timeout_ms(engine, GROUP_LOCK_WAIT_MS))
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(f"SET lock_timeout = {int(wait)}")
            self._connection.commit()
        except engine.dialect.loaded_dbapi.Error as err:
            self.close()
            raise sqlalchemy_error(engine, "SET lock_timeout", None, err) from err

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):  # lost already, or the engine is going away
                connection.close()


def driver_rows(session: Session, sql: str, params: Any) -> list[Any]:
    """Run one read on the session's connection with the driver's own cursor; return its rows.

    The bulk reads use this to skip SQLAlchemy's per-row processing. The driver's errors
    are turned into SQLAlchemy's, as every other statement's are, and a lost connection is
    invalidated, so a database outage answers 503 here too and the pool recovers.
    """
    with _driver_cursor(session, sql, params) as cursor:
        cursor.execute(sql, params)
        return list(cursor.fetchall())


def driver_rows_meanwhile(
    session: Session, sql: str, params: list[Any], meanwhile: Callable[[], None]
) -> list[Any]:
    """Run ``sql`` once for each set of ``params`` and return all their rows; call
    ``meanwhile`` while the database works on them.

    On PostgreSQL the statements go out in psycopg's pipeline mode, which sends them
    without waiting for their results: the server executes them while ``meanwhile``
    runs in this thread, and their rows are read after it returns. No second thread, so
    nothing contends for the GIL. SQLite does its work in this process: the statements
    run first, then ``meanwhile``.
    """
    with _driver_cursor(session, sql, params) as cursor:
        if session.get_bind().dialect.name != "postgresql":
            rows = [row for each in params for row in cursor.execute(sql, each).fetchall()]
            meanwhile()
            return rows
        connection = cursor.connection
        with connection.pipeline(), contextlib.ExitStack() as stack:
            cursors = [cursor] + [stack.enter_context(connection.cursor()) for _ in params[1:]]
            for each_cursor, each in zip(cursors, params, strict=True):
                each_cursor.execute(sql, each)
            meanwhile()
            return [row for each_cursor in cursors for row in each_cursor.fetchall()]


@contextmanager
def _driver_cursor(session: Session, sql: str, params: Any) -> Iterator[Any]:
    connection = session.connection()
    dbapi_connection = connection.connection
    driver_error = connection.dialect.loaded_dbapi.Error
    cursor = dbapi_connection.cursor()
    try:
        yield cursor
    except driver_error as err:
        lost = connection.dialect.is_disconnect(err, dbapi_connection, cursor)
        if lost:
            connection.invalidate(err)
        raise sqlalchemy_error(connection.engine, sql, params, err, lost) from err
    finally:
        # on a lost connection closing fails too; the error above already says so
        with contextlib.suppress(driver_error):
            cursor.close()


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Statement:
    """One SQL text with ``:name`` parameters, run by the driver's own cursor.

    The one-click path runs a handful of small statements per change, and SQLAlchemy's
    work around each (compiled cache, execution context, result object) cost more than
    the database's. Here the text is adapted once per driver, the typed parameters go
    through their SQLAlchemy types' own bind processors (so a time is stored exactly as
    the ORM stores it), and a statement costs one driver call.
    """

    def __init__(self, sql: str, **types: TypeEngine[Any]) -> None:
        self.sql = sql
        self._types = types
        self._prepared: dict[tuple[str, str], tuple[str, list[tuple[str, Any]]]] = {}

    def _for(self, dialect: Dialect) -> tuple[str, list[tuple[str, Any]]]:
        key = (dialect.name, dialect.driver)
        prepared = self._prepared.get(key)
        if prepared is None:
            style = dialect.paramstyle
            if dialect.name == "sqlite":  # sqlite3 takes :name whatever SQLAlchemy's style
                sql = self.sql
            elif style == "pyformat":
                sql = _NAMED.sub(r"%(\1)s", self.sql.replace("%", "%%"))
            else:
                raise NotImplementedError(f"no Statement for paramstyle {style!r}")
            processors = [
                (n, t.dialect_impl(dialect).bind_processor(dialect)) for n, t in self._types.items()
            ]
            prepared = self._prepared[key] = (sql, [(n, p) for n, p in processors if p is not None])
        return prepared

    def first(self, session: Writer, params: dict[str, Any]) -> tuple[Any, ...] | None:
        """Run the statement in the session's transaction; return its first row, if any."""
        sql, processors = self._for(session.get_bind().dialect)
        for name, process in processors:
            params[name] = process(params[name])
        if isinstance(session, DriverTransaction):
            cursor = session.execute(sql, params)
            return cursor.fetchone() if cursor.description else None
        with _driver_cursor(session, sql, params) as cursor:
            cursor.execute(sql, params)
            row: tuple[Any, ...] | None = cursor.fetchone() if cursor.description else None
            return row
