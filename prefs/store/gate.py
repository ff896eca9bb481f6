"""The engines' settings, and SQLite's write gate: one writer at a time, waiting its turn in a file lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

WRITE = "prefs_write"


# Every write transaction on PostgreSQL says first, before it is given a transaction id, that it
# may write audit events: the change feed waits for the transactions that hold this lock, and
# only for them (feeds.py). It conflicts only with what a write to the table meets anyway.
WRITER_LOCK = "LOCK TABLE events IN ROW EXCLUSIVE MODE"


T = TypeVar("T")


R = TypeVar("R")


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
            try:
                fd = self._file()
            except OSError as err:  # a folder that takes no new file: no write can be made
                raise OperationalError("BEGIN IMMEDIATE", None, err) from err
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


_busy_timeouts: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def configure_engine(engine: Engine, busy_timeout_ms: int) -> None:
    """Set SQLite's pragmas on every connection and begin writes with BEGIN IMMEDIATE."""
    _busy_timeouts[engine] = busy_timeout_ms
    if engine.dialect.name != "sqlite":
        from . import stalls  # psycopg's, imported only where it is the driver

        stalls.watch(engine)
        return
    if engine.url.database and engine.url.database != ":memory:":
        # a URI filename (file:/path?mode=ro&uri=true) names the same file as the plain path
        _gates[engine] = WriteGate(engine.url.database.removeprefix("file:"), busy_timeout_ms / 1000)

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
        # a deleted row's bytes are overwritten with zeros, whatever the build's default: an
        # erased address must not stay readable in the file's free space
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # a deferred transaction that reads and then writes cannot wait for the lock
        # (SQLITE_BUSY at once); taking it up front lets the busy timeout do its job
        if connection.get_execution_options().get(WRITE):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def write_gate(engine: Engine) -> contextlib.AbstractContextManager[None]:
    """Return the SQLite database's write gate to hold, or a no-op for PostgreSQL."""
    gate = _gates.get(engine)
    return contextlib.nullcontext() if gate is None else gate.held()


def gate_of(engine: Engine) -> WriteGate | None:
    """Return the write gate of a SQLite engine, or None (PostgreSQL has row locks)."""
    return _gates.get(engine)


def busy_timeout_ms(engine: Engine, default: int = 5000) -> int:
    """Return how long a write on ``engine`` waits for a lock another session holds."""
    return _busy_timeouts.get(engine, default)
