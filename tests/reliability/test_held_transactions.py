"""Transactions left open beside the service: the change feed keeps up, and skips nothing.

A forgotten psql session in another database or in this one (not touching prefs's tables),
and a writer of events held open mid-write, while one-clicks are written and a mailer
polls ``GET /api/v1/changes``: each acknowledged change is in the feed within 2 s, once.
On SQLite the held transactions are a reader of the service's own file and a writer of
another file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from sqlalchemy import create_engine, text

from prefs.domain import feeds, ledger
from prefs.domain.tokens import Tokens
from prefs.extensions import db
from tests.conftest import SERVER_URL, TEST_KEYS, drop_postgresql_database, fresh_postgresql_database
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Cluster, Service, request, seed, timed

pytestmark = pytest.mark.reliability

CHANGES = 240
CLIENTS = 4
WITHIN = 2.0  # seconds from an acknowledged change to the feed
POLL = 0.1


@contextmanager
def forgotten_transaction(url: str) -> Iterator[None]:
    """Hold a transaction with an assigned id open, as a forgotten psql session would."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_current_xact_id()"))
            yield
            conn.rollback()
    finally:
        engine.dispose()


@contextmanager
def sqlite_transaction(path: str, write: bool) -> Iterator[None]:
    """Hold a read transaction (or a write transaction) open on a SQLite file."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        if write:
            conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
            conn.execute("INSERT INTO other VALUES (1)")
        else:
            conn.execute("SELECT count(*) FROM events").fetchone()
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def api_write_held_mid_write(
    base: str, database_url: str, api: dict[str, str], email: str, hold: float
) -> tuple[int | None, float]:
    """Report a complaint through the API while an operator's psql holds the subscriber's row.

    The service's write is given its transaction id, then waits for the row, before it
    writes its event: a writer that commits after later ones. Return its status and when
    it was answered.
    """
    engine = create_engine(database_url)
    body = json.dumps({"events": [{"type": "complaint", "email": email}]}).encode()
    headers = {**api, "Content-Type": "application/json"}
    answered: list[tuple[int | None, float]] = []
    try:
        with engine.connect() as psql:
            psql.execute(text("SELECT id FROM subscribers WHERE email = :e FOR UPDATE"), {"e": email})

            def write() -> None:
                outcome = timed(base, "POST", "/api/v1/events", body=body, headers=headers)
                answered.append((outcome.status, time.monotonic()))

            writer = threading.Thread(target=write)
            writer.start()
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
            deadline = time.monotonic() + 10
            while not psql.execute(waiting).scalar() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(hold)  # the fault itself: the row stays held
            psql.rollback()
            writer.join(30)
    finally:
        engine.dispose()
    return answered[0] if answered else (None, time.monotonic())


def test_transactions_held_open_beside_the_service_do_not_stall_the_feed(service_database, tmp_path):
    addresses = [f"held{i:03d}@example.com" for i in range(CHANGES + 1)]
    _, seeded = seed(service_database, tmp_path / "instance", addresses)
    tokens = Tokens(TEST_KEYS)
    links = [tokens.unsubscribe(pid, "news", "held") for pid in seeded.public_ids[:CHANGES]]
    api = {"Authorization": f"Bearer {seeded.api_key}"}
    postgresql = service_database.startswith("postgresql")
    service = Service(service_database, tmp_path, PREFS_WORKERS="2", PREFS_THREADS="4").start()
    acknowledged: dict[str, float] = {}  # address -> when its 200 arrived
    seen: dict[str, float] = {}  # address -> when the feed first showed it
    repeated: list[str] = []
    statuses: list[int | None] = []
    lags: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        for index in range(n, CHANGES, CLIENTS):
            outcome = timed(service.base, "POST", f"/u/{links[index]}", body=ONE_CLICK_BODY, headers=FORM)
            with lock:
                statuses.append(outcome.status)
                if outcome.status == 200:
                    acknowledged[addresses[index]] = outcome.started + outcome.elapsed
            time.sleep(0.02)

    def mailer() -> None:
        cursor = ""
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            status, _, body = request(service.base, "GET", "/api/v1/changes?limit=50" + cursor, headers=api)
            now = time.monotonic()
            page = json.loads(body) if status == 200 else {"items": [], "next_cursor": None}
            with lock:
                statuses.append(status)
                lags.append(page.get("lag_seconds", -1))
                for item in page["items"]:
                    if item["email"] in seen:
                        repeated.append(item["email"])
                    seen.setdefault(item["email"], now)
            if page["next_cursor"]:
                cursor = "&after=" + page["next_cursor"]
            if not page["items"]:
                stop.wait(POLL)

    with ExitStack() as held:
        if postgresql:
            foreign = fresh_postgresql_database(SERVER_URL, "prefs_foreign")
            held.callback(drop_postgresql_database, foreign)
            held.enter_context(forgotten_transaction(foreign))
            held.enter_context(forgotten_transaction(service_database))
        else:
            path = service_database.removeprefix("sqlite:///")
            held.enter_context(sqlite_transaction(path, write=False))
            held.enter_context(sqlite_transaction(str(tmp_path / "other.sqlite3"), write=True))
        reader = threading.Thread(target=mailer)
        reader.start()
        clients = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
        try:
            for thread in clients:
                thread.start()
            if postgresql:
                time.sleep(0.5)
                status, at = api_write_held_mid_write(
                    service.base, service_database, api, addresses[CHANGES], hold=1.0
                )
                with lock:
                    statuses.append(status)
                    if status == 200:
                        acknowledged[addresses[CHANGES]] = at
            for thread in clients:
                thread.join(120)
            last = max(acknowledged.values(), default=time.monotonic())
            while time.monotonic() < last + WITHIN + 1 and len(seen) < len(acknowledged):
                time.sleep(POLL)
        finally:
            stop.set()
            reader.join(30)
            service.stop()
    delays = {a: seen[a] - at for a, at in acknowledged.items() if a in seen}
    missing = [a for a in acknowledged if a not in seen]
    late_ones = sorted(a for a, d in delays.items() if d > WITHIN)
    server_errors = sum(1 for s in statuses if s is not None and s >= 500)
    worst = max(delays.values(), default=0.0)
    report(
        "transactions held open (other database, this one, a writer mid-write)",
        CHANGES + (1 if postgresql else 0),
        len(acknowledged),
        len(missing) + len(late_ones),
        server_errors,
        f"held transactions: {len(acknowledged)} changes acknowledged, {len(seen)} in the feed,"
        f" {len(missing)} missing, {len(late_ones)} later than {WITHIN} s (worst {worst:.2f} s),"
        f" {len(repeated)} repeated, {server_errors} 5xx",
    )
    assert server_errors == 0
    assert len(acknowledged) == CHANGES + (1 if postgresql else 0)
    assert not missing and not repeated
    assert not late_ones, {a: round(delays[a], 2) for a in late_ones}
    assert all(lag >= 0 for lag in lags)
    if postgresql:  # the changes written behind the held write waited, and the pages said so
        assert max(lags) > 0


def test_prepared_transactions_hold_the_feed_only_when_they_wrote_events(tmp_path):
    """Two-phase commits left prepared: in another database, in this one, and one that wrote an event.

    On a throwaway cluster of the test's own that allows prepared transactions (the shared
    server does not), so it runs in the SQLite pass too.
    """
    cluster = Cluster(max_prepared_transactions="4")
    cluster.start()
    try:
        url = fresh_postgresql_database(cluster.url, "prefs_2pc")
        other = fresh_postgresql_database(cluster.url, "other_2pc")
        app, seeded = seed(url, tmp_path / "instance", [f"p{i}@example.com" for i in range(5)])
        engines = [create_engine(url), create_engine(other)]
        shown: list[list[str]] = []
        lags: list[float] = []
        with app.app_context():
            session = db.session()
            cursor = feeds.change_page(session, None, 100).next_cursor
            session.commit()

            def write_and_read(public_id: str) -> None:
                nonlocal cursor
                ledger.record_opt_out(session, public_id, "news", ledger.Origin("api"))
                page = feeds.change_page(session, cursor, 100)
                session.commit()
                shown.append([item["email"] for item in page.items])
                lags.append(page.lag_seconds)
                cursor = page.next_cursor

            this, another = engines
            with another.connect() as conn:
                conn.execute(text("CREATE TABLE t (x int)"))
                conn.execute(text("PREPARE TRANSACTION 'another database'"))
            with this.connect() as conn:
                conn.execute(text("CREATE TABLE unrelated (x int)"))
                conn.execute(text("PREPARE TRANSACTION 'this database, no events'"))
            write_and_read(seeded.public_ids[0])
            with this.connect() as conn:
                conn.execute(text("LOCK TABLE events IN ROW EXCLUSIVE MODE"))  # as a prefs write begins
                conn.execute(
                    text(
                        "INSERT INTO events (txid, subscriber_id, action, source, created_at) SELECT"
                        " pg_current_xact_id()::text::bigint, id, 'unsubscribe', 'cli', now()"
                        " FROM subscribers WHERE email = 'p4@example.com'"
                    )
                )
                conn.execute(text("PREPARE TRANSACTION 'this database, an event'"))
            write_and_read(seeded.public_ids[1])  # behind the prepared event: held back
            with this.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("COMMIT PREPARED 'this database, an event'"))
                conn.execute(text("ROLLBACK PREPARED 'this database, no events'"))
            with another.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ROLLBACK PREPARED 'another database'"))
            write_and_read(seeded.public_ids[2])
            db.session.remove()
            db.engine.dispose()
        for engine in engines:
            engine.dispose()
    finally:
        cluster.remove()
    expected = [["p0@example.com"], [], ["p4@example.com", "p1@example.com", "p2@example.com"]]
    lost = sum(1 for got, want in zip(shown, expected, strict=True) if got != want)
    report(
        "prepared transactions (other database, this one, one with an event)",
        4,
        4,
        lost,
        0,
        f"prepared transactions: pages {shown}, lag {lags}",
    )
    assert shown == expected
    assert lags[1] > 0 and lags[0] == lags[2] == 0
