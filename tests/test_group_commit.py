"""Concurrent single changes commit together, and each request still gets its own outcome."""

import sqlite3
import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from prefs.domain import ledger
from prefs.domain.changes import Origin
from prefs.errors import DomainError, UnknownSubscriber
from prefs.extensions import db
from prefs.store import GroupCommit, Statement, write_transaction
from tests.factories import make_subscriber, make_topic

INSERT = Statement("INSERT INTO instance_secrets (name, value) VALUES (:name, 'v')")


def stored(names: list[str]) -> set[str]:
    with db.engine.connect() as conn:
        rows = conn.execute(text("SELECT name FROM instance_secrets")).scalars().all()
    return set(rows) & set(names)


class Recorder:
    """An apply function that writes a row per item; the first call waits until told."""

    def __init__(self, hold_first: bool = False) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.hold_first = hold_first
        self.calls: list[str] = []
        self.writers: dict[str, Any] = {}  # the transaction each change was applied in

    def __call__(self, writer: Any, name: str) -> str:
        self.calls.append(name)
        self.writers[name] = writer
        if self.hold_first and len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if name.startswith("unknown"):
            raise UnknownSubscriber(name)
        if name.startswith("broken"):
            raise RuntimeError(name)
        if name.startswith("busy"):
            raise OperationalError("INSERT", None, TimeoutError("the database is busy"))
        if name.endswith(("-deadlock", "-held")) and self.calls.count(name) == 1:
            # PostgreSQL's: a deadlock detected; a lock not had within lock_timeout
            raise OperationalError("INSERT", None, Refused("40P01" if "deadlock" in name else "55P03"))
        INSERT.first(writer, {"name": name})
        return name.upper()


class Refused(Exception):
    """A driver's error with PostgreSQL's SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def held_group(hold_first: bool = True) -> tuple[Recorder, GroupCommit[str, str]]:
    """Return a recorder (its first call waits until released) and a group commit over it."""
    recorder = Recorder(hold_first=hold_first)
    return recorder, GroupCommit(recorder, DomainError, order=str, engine=db.engine)


def run_together(app, group: GroupCommit, recorder: Recorder, names: list[str]) -> dict[str, Any]:
    """Start one thread per name; the first leads and holds until all others are queued."""
    outcomes: dict[str, Any] = {}
    seen_on_return: dict[str, bool] = {}

    def one(name: str) -> None:
        with app.app_context():
            try:
                outcomes[name] = group.run(name, db.session())
            except Exception as err:  # the outcome under test
                outcomes[name] = err
            # nobody hears back before their change is on disk
            seen_on_return[name] = name in stored([name])

    first = threading.Thread(target=one, args=(names[0],))
    first.start()
    assert recorder.entered.wait(10)
    rest = [threading.Thread(target=one, args=(n,)) for n in names[1:]]
    for thread in rest:
        thread.start()
    while len(group._queue) < len(rest):  # all queued behind the leader
        threading.Event().wait(0.005)
    recorder.release.set()
    for thread in [first, *rest]:
        thread.join(20)
    outcomes["_seen"] = seen_on_return
    return outcomes


def test_waiting_changes_commit_in_one_transaction_and_each_gets_its_result(app):
    recorder, group = held_group()
    names = ["lead"] + [f"follower{i}" for i in range(5)]
    outcomes = run_together(app, group, recorder, names)
    assert {n: outcomes[n] for n in names} == {n: n.upper() for n in names}
    assert stored(names) == set(names)
    assert all(outcomes["_seen"][n] for n in names)
    # the leader's own transaction, then one for the five that waited
    transactions = [recorder.writers[n] for n in names]
    assert transactions[0] is not transactions[1]
    assert all(t is transactions[1] for t in transactions[1:])


def test_a_domain_error_fails_only_its_own_change(app):
    recorder, group = held_group()
    names = ["lead", "a", "unknown-b", "c"]
    outcomes = run_together(app, group, recorder, names)
    assert isinstance(outcomes["unknown-b"], UnknownSubscriber)
    assert outcomes["a"] == "A" and outcomes["c"] == "C"
    assert stored(names) == {"lead", "a", "c"}


def test_an_unexpected_failure_retries_the_others_alone(app):
    recorder, group = held_group()
    names = ["lead", "a", "broken-b", "c"]
    outcomes = run_together(app, group, recorder, names)
    assert isinstance(outcomes["broken-b"], RuntimeError)
    assert outcomes["a"] == "A" and outcomes["c"] == "C"
    assert stored(names) == {"lead", "a", "c"}
    # the group was tried once together, then each change on its own
    assert recorder.calls.count("a") == 2


def test_a_database_that_is_down_or_busy_fails_the_group_at_once(app):
    # retried one by one, the last change would wait out every timeout in turn
    recorder, group = held_group()
    names = ["lead", "a", "busy-b", "c"]
    outcomes = run_together(app, group, recorder, names)
    assert all(isinstance(outcomes[n], OperationalError) for n in ("a", "busy-b", "c"))
    assert recorder.calls == ["lead", "a", "busy-b"]  # no change tried again
    assert stored(names) == {"lead"}


def test_a_deadlock_tries_the_group_again(app):
    recorder, group = held_group()
    names = ["lead", "a", "b-deadlock", "c"]
    outcomes = run_together(app, group, recorder, names)
    assert {n: outcomes[n] for n in names} == {n: n.upper() for n in names}
    assert stored(names) == set(names)
    assert recorder.calls == ["lead", "a", "b-deadlock", "a", "b-deadlock", "c"]
    assert recorder.writers["a"] is recorder.writers["c"]  # together again


def test_a_change_whose_row_is_held_elsewhere_waits_alone_and_the_others_commit(app):
    recorder, group = held_group()
    names = ["lead", "a", "b-held", "c"]
    outcomes = run_together(app, group, recorder, names)
    assert {n: outcomes[n] for n in names} == {n: n.upper() for n in names}
    assert stored(names) == set(names)
    # the group went on without it; it was tried once more, alone, in its own session
    assert recorder.calls == ["lead", "a", "b-held", "a", "c", "b-held"]
    assert recorder.writers["a"] is recorder.writers["c"]
    assert isinstance(recorder.writers["b-held"], Session)


def test_changes_are_applied_in_order_so_groups_lock_rows_alike(app):
    recorder, group = held_group()
    run_together(app, group, recorder, ["lead", "d", "b", "c", "a"])
    assert recorder.calls[1:] == ["a", "b", "c", "d"]


def test_a_follower_reads_its_own_change_afterwards(app):
    # SQLite keeps a read transaction's snapshot: a follower that had read before queueing
    # must not go on seeing the database as it was before its own change was committed
    recorder, group = held_group()
    seen: list[int] = []
    count = text("SELECT count(*) FROM instance_secrets WHERE name = 'follower'")

    def lead(name: str) -> None:
        with app.app_context():
            group.run(name, db.session())

    def follow() -> None:
        with app.app_context():
            session = db.session()
            seen.append(session.execute(count).scalar())  # a snapshot from before
            group.run("follower", session)
            seen.append(session.execute(count).scalar())

    leader = threading.Thread(target=lead, args=("lead",))
    leader.start()
    assert recorder.entered.wait(10)
    # the next group's leader queues first, so the follower's change is committed by it
    second = threading.Thread(target=lead, args=("second",))
    second.start()
    while len(group._queue) < 1:
        threading.Event().wait(0.005)
    follower = threading.Thread(target=follow)
    follower.start()
    while len(group._queue) < 2:
        threading.Event().wait(0.005)
    recorder.release.set()
    for thread in (leader, second, follower):
        thread.join(20)
    assert recorder.calls == ["lead", "follower", "second"]  # one group after the first
    assert seen == [0, 1]


def test_inside_a_write_transaction_the_change_joins_it(app, session):
    _, group = held_group(hold_first=False)
    with pytest.raises(RuntimeError), write_transaction(session):
        assert group.run("inner", session) == "INNER"
        raise RuntimeError("the outer transaction fails")
    assert stored(["inner"]) == set()


def test_concurrent_one_click_opt_outs_are_all_recorded(app):
    # the real path: many threads opting out at once, each change and its event on disk
    with app.app_context():
        session = db.session()
        make_topic(session, "news")
        people = [make_subscriber(session, f"p{i}@example.com").public_id for i in range(24)]
        session.commit()
    results: dict[str, bool] = {}
    start = threading.Barrier(len(people))

    def opt_out(public_id: str) -> None:
        with app.app_context():
            start.wait(10)
            results[public_id] = ledger.record_opt_out(db.session(), public_id, "news", Origin("one-click"))

    threads = [threading.Thread(target=opt_out, args=(p,)) for p in people]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == dict.fromkeys(people, True)
    with db.engine.connect() as conn:
        events = conn.execute(text("SELECT count(*) FROM events WHERE action = 'unsubscribe'")).scalar()
        out = conn.execute(text("SELECT count(*) FROM preferences WHERE NOT subscribed")).scalar()
    assert events == out == len(people)


def unsubscribes() -> int:
    with db.engine.connect() as conn:
        return int(
            conn.execute(text("SELECT count(*) FROM events WHERE action = 'unsubscribe'")).scalar_one()
        )


def kept_connection() -> Any:
    """Return the driver connection the ledger's group commit keeps for this database."""
    return ledger._group(db.engine)._own._connection


def cut(connection: Any) -> None:
    """Lose a driver connection underneath its owner, as a database restart would."""
    if db.engine.dialect.name == "sqlite":
        connection.close()
        return
    with db.engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": connection.info.backend_pid})


def is_closed(connection: Any) -> bool:
    if db.engine.dialect.name != "sqlite":
        return bool(connection.closed)
    try:
        connection.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def one_opted_out(session: Any, count: int) -> list[str]:
    """Make ``count`` subscribers to "news" and opt the first out; return their public ids."""
    make_topic(session, "news")
    people = [make_subscriber(session, f"p{i}@example.com").public_id for i in range(count)]
    session.commit()
    assert ledger.record_opt_out(session, people[0], "news", Origin("one-click"))
    return people


def test_a_group_commits_on_a_connection_of_its_own_outside_the_pool(session):
    people = one_opted_out(session, 2)
    kept = kept_connection()
    session.commit()
    # nothing is left checked out: the kept connection does not count against the pool
    assert db.engine.pool.checkedout() == 0
    assert ledger.record_opt_out(session, people[1], "news", Origin("one-click"))
    assert kept_connection() is kept
    assert unsubscribes() == 2


def test_a_kept_connection_lost_while_idle_is_replaced_and_the_change_recorded(session):
    people = one_opted_out(session, 2)
    lost = kept_connection()
    cut(lost)
    assert ledger.record_opt_out(session, people[1], "news", Origin("one-click"))
    assert kept_connection() is not lost
    assert unsubscribes() == 2


def test_disposing_of_the_engine_closes_the_kept_connection(session):
    one_opted_out(session, 1)
    kept = kept_connection()
    session.close()
    db.engine.dispose()
    assert is_closed(kept)
