"""The group commit: the single changes of concurrent requests, committed together in one transaction."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from .driver import DriverTransaction, OwnConnection, Writer
from .gate import WRITE, busy_timeout_ms, gate_of
from .transactions import (
    CONFLICT_TRIES,
    back_off,
    conflict,
    end_read,
    lock_wait,
    run_committed,
    unavailable,
    write_transaction,
)

T = TypeVar("T")
R = TypeVar("R")


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


# how long a change taken out of its group waits for one of the few connections that such
# changes may hold at once, before it fails (its row is most likely held for long)
ALONE_SLOT_WAIT = 0.5


# rows remembered as held before the expired ones are forgotten
HELD_KEPT = 1000


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
        self._own: OwnConnection | None = None
        if not (engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:")):
            own = self._own = OwnConnection()
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
        timeout = busy_timeout_ms(engine, 5000) / 1000
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
            if len(group) == 1 or unavailable(err):
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
        gate = gate_of(engine)
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
