"""Write transactions that commit before an answer, snapshots for reads, and the errors a write meets."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.orm import Session

from .gate import WRITE, WRITER_LOCK, busy_timeout_ms, gate_of

T = TypeVar("T")


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
    gate = gate_of(session.get_bind().engine)
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
        busy = int(busy_timeout_ms(engine, 5000))
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


def sqlalchemy_error(
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


def unavailable(err: Exception) -> bool:
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
