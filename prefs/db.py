"""Tune the engines, open write transactions that never deadlock on SQLite, commit in groups."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from sqlalchemy import Dialect, Engine, event
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from . import stalls

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


def end_read(session: Session) -> None:
    """End the session's read transaction, if any: on SQLite it keeps its snapshot until then."""
    if session.in_transaction():
        session.commit()


@contextmanager
def read_snapshot(session: Session) -> Iterator[Session]:
    """Run the block's reads in one snapshot, and end it after the block.

    On PostgreSQL a REPEATABLE READ, READ ONLY transaction; on SQLite one read transaction
    (in WAL mode its snapshot is taken by the first read and kept to its end).
    """
    end_read(session)
    if session.get_bind().dialect.name == "postgresql":
        session.connection(
            execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
        )
    try:
        yield session
    except BaseException:
        with contextlib.suppress(SQLAlchemyError):  # a lost connection has nothing left to end
            session.rollback()
        raise
    session.rollback()  # nothing to keep, and the snapshot must not outlive the block


@contextmanager
def write_transaction(session: Session, events: bool = True) -> Iterator[Session]:
    """Run the block in one write transaction and commit it before returning.

    Called inside another write transaction, the block joins it: the outer one commits.
    ``events=False`` promises that the block writes no audit events: it then takes no
    ``WRITER_LOCK``, so a migration holding ``events`` does not hold it up.
    """
    if session.info.get(WRITE):
        yield session
        return
    end_read(session)  # the write must begin as a write
    gate = _gates.get(session.get_bind().engine)
    if gate is None:
        with _transaction(session, events):
            yield session
        return
    with gate.held(), _transaction(session, events):
        yield session


def bound_lock_waits(session: Session) -> None:
    """In a write transaction on PostgreSQL: let no statement wait longer than the busy timeout.

    ``lock_timeout`` counts each lock anew, and a second waiter on one row waits for two (the
    row's place in line, then its holder): a page's change to a held row would answer after
    twice the busy timeout. A change of one subscriber's is a few small statements.
    """
    engine = session.get_bind().engine
    if engine.dialect.name == "postgresql":
        busy = int(_busy_timeouts.get(engine, 5000))
        session.connection().exec_driver_sql(f"SET LOCAL statement_timeout = {busy}")


def run_committed(session: Session, work: Callable[[], T], events: bool = True) -> T:
    """Run ``work`` in one write transaction and commit it; return what it returned.

    A deadlock or serialization failure rolls it back and runs it again, a few times with
    a random pause: the other transaction has gone on by then. Called inside another write
    transaction, ``work`` joins it, and the outer one retries. ``events`` is as for
    ``write_transaction``.
    """
    if session.info.get(WRITE):
        return work()
    attempt = 1
    while True:
        try:
            with write_transaction(session, events):
                return work()
        except DBAPIError as err:
            if attempt >= CONFLICT_TRIES or not conflict(err):
                raise
        back_off(attempt)
        attempt += 1


# a deadlock or serialization failure is tried this many times in all before it is a 503
CONFLICT_TRIES = 4


def back_off(attempt: int) -> None:
    """Pause before the next try of a transaction that lost a conflict: random, growing."""
    time.sleep(random.uniform(0.002, 0.010 * 2**attempt))  # noqa: S311 (jitter, not a secret)


@contextmanager
def _transaction(session: Session, events: bool = True) -> Iterator[None]:
    connection = session.connection(execution_options={WRITE: True})
    session.info[WRITE] = True
    try:
        if events and connection.dialect.name == "postgresql":
            connection.exec_driver_sql(WRITER_LOCK)
        yield
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.info.pop(WRITE, None)


class _WaitAlone(Exception):
    """A change's outcome in a group: a lock it needs is held elsewhere; try it alone."""


class _Waiter(Generic[T, R]):
    """One request's change, waiting in a group commit for its outcome."""

    __slots__ = ("done", "error", "item", "leads", "result", "woken")

    def __init__(self, item: T) -> None:
        self.item = item
        self.woken = threading.Event()
        self.leads = False
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None

    def settle(self, result: R | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True
        self.woken.set()

    def outcome(self) -> R:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


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
            raise _sqlalchemy_error(self.engine, sql, params, err, self.lost) from err


# what a single change's statements run in: a caller's session, or a group commit's transaction
Writer = Session | DriverTransaction


# how long a group's connection waits for a row lock before the change that needs it is
# taken out of the group and tried alone (a group commits in a few milliseconds)
GROUP_LOCK_WAIT_MS = 100
# how long a change taken out of its group waits for one of the few connections that such
# changes may hold at once, before it fails (its row is most likely held for long)
ALONE_SLOT_WAIT = 0.5
# rows remembered as held before the expired ones are forgotten
HELD_KEPT = 1000


class _OwnConnection:
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
                raise _sqlalchemy_error(engine, None, None, err) from err
            self._connection, self._pid, self.fresh = pooled.dbapi_connection, os.getpid(), True
            pooled.detach()
            if engine.dialect.name == "postgresql":
                self._wait_briefly(engine)
        else:
            self.fresh = False
        return self._connection

    def _wait_briefly(self, engine: Engine) -> None:
        """Make this connection give up on a lock after ``GROUP_LOCK_WAIT_MS`` (at most the busy timeout)."""
        wait = min(GROUP_LOCK_WAIT_MS, _busy_timeouts.get(engine, GROUP_LOCK_WAIT_MS))
        try:
            with self._connection.cursor() as cursor:
                cursor.execute(f"SET lock_timeout = {int(wait)}")
            self._connection.commit()
        except engine.dialect.loaded_dbapi.Error as err:
            self.close()
            raise _sqlalchemy_error(engine, "SET lock_timeout", None, err) from err

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):  # lost already, or the engine is going away
                connection.close()


class GroupCommit(Generic[T, R]):
    """Commit the single changes of concurrent requests together: one transaction for many.

    Each commit waits for the disk (an fsync on SQLite, the WAL flush on PostgreSQL) and,
    on SQLite, holds the one write lock. Under a burst of one-click POSTs most of a
    request's time went there. Here the first request to arrive leads: it takes every
    change waiting in this process, applies each in one write transaction, commits, and
    only then wakes the others with their outcomes, so nobody is answered before their
    change is on disk. Whoever arrived during that commit leads the next group.

    The group's transaction runs on a driver connection of its own (there is one leader
    at a time), not in a session: a session's checkout, begin and commit cost more than
    the statements of a one-click. ``apply`` gets a ``DriverTransaction``; ``on_commit``
    gets its ``info`` once it is committed. A connection found lost is replaced, and a
    group that met a lost connection it had used before is tried once more on a new one
    (the database may have restarted while it sat idle). An in-memory SQLite database
    has no second connection to the same data: there the group runs in a session.

    ``apply`` raising ``expected`` (a domain error: unknown subscriber, say) fails that
    change alone; it must raise it before writing anything. Any other failure rolls the
    group back and each change is retried in a transaction of its own, so one change's
    fault is never another's. Changes are applied in ``order``, the ledger's lock order:
    on PostgreSQL groups lock their rows as every other writer does and deadlock nobody.

    A row another transaction holds (an operator's ``SELECT … FOR UPDATE``, a long batch)
    must not hold up the others' changes. The group's connection waits at most
    ``GROUP_LOCK_WAIT_MS`` for a lock; the change that could not get its lock is taken
    out, the rest are applied again and committed, and that change is tried alone, in its
    own request's thread and a pooled connection, with the full busy timeout (``_alone``
    bounds how many such waits a process holds). A deadlock or serialization failure (a
    foreign transaction's doing) is tried again, a few times.
    A database that is down, or SQLite's one write lock held past the busy timeout, fails
    every change of the group at once: that is an outage for all of them.
    """

    def __init__(
        self,
        apply: Callable[[Any, T], R],
        expected: type[Exception],
        order: Callable[[T], Any],
        engine: Engine,
        on_commit: Callable[[dict[str, Any]], None] = lambda info: None,
        limit: int = 64,
    ) -> None:
        self._apply = apply
        self._expected = expected
        self._order = order
        self._on_commit = on_commit
        self._limit = limit
        self._mutex = threading.Lock()
        self._queue: list[_Waiter[T, R]] = []
        self._leading = False
        self._engine = weakref.ref(engine)  # the engine's map of groups holds the group
        size = getattr(engine.pool, "size", None)
        self._alone_slots = threading.BoundedSemaphore(max(1, size() // 2) if callable(size) else 2)
        # the order keys (rows) of changes that met a lock held elsewhere, until when to expect it held
        self._held: dict[Any, float] = {}
        self._own: _OwnConnection | None = None
        if not (engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")):
            own = self._own = _OwnConnection()
            event.listen(engine, "engine_disposed", lambda _engine: own.close())
            weakref.finalize(self, own.close)

    def run(self, item: T, session: Session | None = None) -> R:
        """Apply ``item`` and commit it, with whatever else is waiting; return its result.

        ``session`` is the caller's, if it has one. Inside its write transaction the change
        joins it. Otherwise its read ends first: another request's group may commit this
        change, and what the caller reads next must show it.
        """
        if session is not None:
            if session.info.get(WRITE):
                return self._apply(session, item)  # inside a caller's transaction: theirs commits
            end_read(session)
        if self._held and self._held.get(self._order(item), 0.0) > time.monotonic():
            return self._alone(item, session)  # its row is held elsewhere: no group need wait for it
        me: _Waiter[T, R] = _Waiter(item)
        with self._mutex:
            self._queue.append(me)
            if not self._leading:
                self._leading = me.leads = True
        if not me.leads:
            # woken with an outcome, or to lead the next group; a leader's every step is
            # bounded by the database's timeouts, and a hung worker by gunicorn's
            me.woken.wait()
        if not me.done:
            self._lead()
        try:
            return me.outcome()
        except _WaitAlone:
            return self._alone(item, session)

    def _alone(self, item: T, session: Session | None) -> R:
        """Apply one change in a transaction of its own, waiting for its locks the full busy timeout.

        Such changes wait on pooled connections and in request threads: at most half the
        pool's connections at once (``_alone_slots``), and a change that finds them all
        taken waits ``ALONE_SLOT_WAIT`` for one, then fails (503). So many changes to held
        rows (one subscriber clicked again and again, a locked topic) leave the pool and
        the threads to everyone else's requests.
        """
        engine = self._engine()
        assert engine is not None, "a group commit outlived its engine"
        timeout = _busy_timeouts.get(engine, 5000) / 1000
        deadline = time.monotonic() + timeout
        key = self._order(item)
        if len(self._held) >= HELD_KEPT:  # a long outage (a held topic) meets many rows: forget the past
            now = time.monotonic()
            for old, until in list(self._held.items()):
                if until <= now:
                    self._held.pop(old, None)
        self._held[key] = deadline  # until it gets its lock, its row's next changes skip the groups
        if not self._alone_slots.acquire(timeout=min(timeout, ALONE_SLOT_WAIT)):
            raise OperationalError(
                "BEGIN", None, TimeoutError("the locks these changes need are held elsewhere")
            )
        try:

            def apply(writer: Session) -> R:
                if engine.dialect.name == "postgresql":
                    # lock_timeout counts each lock anew, and a second waiter on one row waits
                    # for two (the row's place in line, then the holder): bound the whole wait
                    left = max(1, int((deadline - time.monotonic()) * 1000))
                    writer.connection().exec_driver_sql(f"SET LOCAL statement_timeout = {left}")
                return self._apply(writer, item)

            if session is not None:
                result = run_committed(session, lambda: apply(session))
            else:
                with Session(engine) as own:
                    result = run_committed(own, lambda: apply(own))
            self._held.pop(key, None)
            return result
        finally:
            self._alone_slots.release()

    def _lead(self) -> None:
        with self._mutex:
            group = self._queue[: self._limit]
            del self._queue[: self._limit]
        try:
            self._commit(sorted(group, key=lambda w: self._order(w.item)))
        finally:
            for waiter in group:
                if not waiter.done:  # only if something escaped (a worker being stopped)
                    waiter.settle(error=RuntimeError("the group commit was interrupted"))
            with self._mutex:
                if self._queue:
                    successor = self._queue[0]
                    successor.leads = True
                    successor.woken.set()
                else:
                    self._leading = False

    def _commit(self, group: list[_Waiter[T, R]], again: bool = False, attempt: int = 1) -> None:
        outcomes: list[tuple[_Waiter[T, R], R | None, BaseException | None]] = []
        applying: _Waiter[T, R] | None = None
        try:
            with self._transaction() as writer:
                for waiter in group:
                    applying = waiter
                    try:
                        outcomes.append((waiter, self._apply(writer, waiter.item), None))
                    except self._expected as err:
                        outcomes.append((waiter, None, err))
                applying = None
        except Exception as err:
            if self._stale(err) and not again:
                self._commit(group, again=True, attempt=attempt)
                return
            if applying is not None and self._own is not None and lock_wait(err):
                # another transaction holds a row this change needs: it waits alone, in its
                # own thread, and the others commit without it
                applying.settle(error=_WaitAlone())
                rest = [waiter for waiter in group if waiter is not applying]
                if rest:
                    self._commit(rest, again=again)
                return
            if conflict(err) and attempt < CONFLICT_TRIES:
                back_off(attempt)
                self._commit(group, again=again, attempt=attempt + 1)
                return
            if len(group) == 1 or _unavailable(err):
                # a database that is down or busy is so for each of them: retrying one by
                # one would make the last wait out every timeout in turn
                for waiter in group:
                    waiter.settle(error=err)
                return
            for waiter in group:  # alone, each change meets only its own fault
                self._commit([waiter])
            return
        for waiter, result, error in outcomes:
            waiter.settle(result, error)

    @contextmanager
    def _transaction(self) -> Iterator[Writer]:
        engine = self._engine()
        assert engine is not None, "a group commit outlived its engine"
        if self._own is None:
            with Session(engine) as session, write_transaction(session):
                yield session
            return
        gate = _gates.get(engine)
        with gate.held() if gate is not None else contextlib.nullcontext():
            transaction = DriverTransaction(engine, self._own.get(engine))
            try:
                transaction.begin()
                yield transaction
                transaction.commit()
            except BaseException:
                transaction.rollback()
                if transaction.lost:
                    self._own.close()
                raise
            finally:
                if transaction.cursor is not None:
                    with contextlib.suppress(Exception):
                        transaction.cursor.close()
        self._on_commit(transaction.info)

    def _stale(self, err: Exception) -> bool:
        """Tell whether a group failed on a kept connection that has died since its last use."""
        return (
            self._own is not None
            and not self._own.fresh
            and isinstance(err, DBAPIError)
            and err.connection_invalidated
        )


def _sqlalchemy_error(
    engine: Engine, sql: str | None, params: Any, err: Exception, lost: bool = False
) -> StatementError:
    """Return SQLAlchemy's error for a driver's, as the engine itself would raise it."""
    return DBAPIError.instance(
        sql,
        params,
        err,
        engine.dialect.loaded_dbapi.Error,
        # the parameters are addresses: keep them out of the message, as the engine does
        hide_parameters=engine.hide_parameters,
        connection_invalidated=lost,
    )


def _unavailable(err: Exception) -> bool:
    """Tell whether a failure is the database's (lost, unreachable, busy), not a change's."""
    return isinstance(err, OperationalError) or (isinstance(err, DBAPIError) and err.connection_invalidated)


# PostgreSQL's SQLSTATEs: a deadlock, a serialization failure; a lock not had within lock_timeout
_CONFLICTS = frozenset({"40P01", "40001"})
_LOCK_NOT_AVAILABLE = "55P03"


def _sqlstate(err: BaseException) -> str | None:
    state = getattr(getattr(err, "orig", None), "sqlstate", None)
    return state if isinstance(state, str) else None


def conflict(err: BaseException) -> bool:
    """Tell whether a transaction lost a conflict with another (a deadlock): worth trying again."""
    return _sqlstate(err) in _CONFLICTS


def lock_wait(err: BaseException) -> bool:
    """Tell whether a statement gave up waiting for a lock that another transaction holds."""
    return _sqlstate(err) == _LOCK_NOT_AVAILABLE


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
        raise _sqlalchemy_error(connection.engine, sql, params, err, lost) from err
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
