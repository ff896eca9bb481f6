"""Database outage: PostgreSQL stopped under load, and locks held longer than the busy timeout.

The PostgreSQL here is a throwaway cluster of the test's own (``harness.Cluster``), never
the machine's shared server, so it runs in the SQLite pass and the PostgreSQL pass alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text

from prefs.domain.tokens import Tokens
from prefs.models import Preference, Subscriber
from tests.conftest import TEST_KEYS, drop_postgresql_database, fresh_postgresql_database
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Cluster, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

DOWN_SECONDS = 5
FAST = 2.0  # a refused request answers within this
BACK = 5.0  # requests succeed again within this of the database's return


@pytest.fixture
def cluster():
    server = Cluster()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def kinds(tokens: Tokens, public_ids: list[str], api_key: str):
    """Return the three requests of the load: a page, an API check, a one-click write."""
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    check = json.dumps({"topic": "news", "recipients": ["ann@example.com", "new@example.com"]}).encode()
    page = f"/p/{tokens.preferences(public_ids[0])}"
    return page, ("/api/v1/check", check, api)


def assert_refused_well(outcome: Outcome, kind: str) -> None:
    """A refused request: a fast 503 in the shape of its surface, no stack trace."""
    assert outcome.status == 503, (kind, outcome.status, outcome.error, outcome.body[:200])
    assert outcome.elapsed < FAST, (kind, outcome.elapsed)
    assert b"Traceback" not in outcome.body and b"psycopg" not in outcome.body
    if kind == "api":
        assert outcome.content_type.startswith("application/json")
        assert json.loads(outcome.body)["error"]["code"] == "unavailable"
    else:
        assert outcome.content_type.startswith("text/html")
        assert b"<html" in outcome.body
    assert outcome.headers.get("retry-after")


def test_postgresql_stopped_for_five_seconds_fails_fast_and_comes_back(cluster, tmp_path):
    url = fresh_postgresql_database(cluster.url, "prefs_outage")
    _, seeded = seed(
        url, tmp_path / "instance", [f"out{i}@example.com" for i in range(400)] + ["ann@example.com"]
    )
    tokens = Tokens(TEST_KEYS)
    page, (check_path, check_body, api_headers) = kinds(tokens, seeded.public_ids[-1:], seeded.api_key)
    one_clicks = iter(tokens.unsubscribe(pid, "news", "outage") for pid in seeded.public_ids[:400])
    service = Service(url, tmp_path, PREFS_WORKERS="2", PREFS_THREADS="4").start()
    outcomes: list[tuple[str, Outcome, str | None]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            kind = ("page", "api", "one-click")[n % 3]
            n += 1
            link = None
            if kind == "page":
                outcome = timed(service.base, "GET", page)
            elif kind == "api":
                outcome = timed(service.base, "POST", check_path, body=check_body, headers=api_headers)
            else:
                with lock:
                    link = next(one_clicks, None)
                if link is None:
                    continue
                outcome = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
            with lock:
                outcomes.append((kind, outcome, link))
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        stopping = time.monotonic()
        cluster.stop()
        down = time.monotonic()
        time.sleep(DOWN_SECONDS - (down - stopping))
        starting = time.monotonic()
        cluster.start()
        up = time.monotonic()
        time.sleep(BACK + 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        log = service.log()
        service.stop()

    during = [(k, o) for k, o, _ in outcomes if down <= o.started and o.started + o.elapsed <= starting]
    after = [(k, o) for k, o, _ in outcomes if o.started >= up + BACK]
    statuses = Counter(o.status for _, o, _ in outcomes)
    slowest = max(o.elapsed for _, o, _ in outcomes)
    first_good = min(
        (o.started + o.elapsed for _, o, _ in outcomes if o.started >= up and o.status == 200), default=None
    )
    back_in = None if first_good is None else first_good - up
    acked = [link for k, o, link in outcomes if k == "one-click" and o.status == 200]
    engine = create_engine(url)
    with engine.connect() as conn:
        recorded = set(
            conn.scalars(
                select(Subscriber.public_id)
                .join(Preference, Preference.subscriber_id == Subscriber.id)
                .where(Preference.subscribed.is_(False))
            )
        )
    engine.dispose()
    drop_postgresql_database(url)
    lost = [link for link in acked if link.split(".")[0] not in recorded]
    server_errors = sum(n for s, n in statuses.items() if s is not None and s >= 500)
    report(
        f"PostgreSQL stopped {DOWN_SECONDS} s (503 while down)",
        len(outcomes),
        statuses[200],
        len(lost),
        server_errors,
        f"outage: {len(outcomes)} sent, {statuses[200]} answered 200, {statuses[503]} answered 503 "
        f"(slowest {slowest:.2f} s), {len(lost)} of {len(acked)} acknowledged opt-outs lost, "
        f"back {back_in if back_in is None else round(back_in, 2)} s after PostgreSQL returned",
    )
    unexpected = [(k, o.status, o.body[:300]) for k, o, _ in outcomes if o.status not in (200, 503)]
    errors = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line or "Error:" in line]
    assert not unexpected, (statuses, unexpected, errors[:20])
    assert slowest < FAST
    assert len(during) >= 20
    for kind, outcome in during:
        assert_refused_well(outcome, kind)
    assert after and all(o.status == 200 for _, o in after), Counter(o.status for _, o in after)
    assert back_in is not None and back_in < BACK
    assert not lost
    assert "Traceback" not in log


def test_a_postgresql_row_lock_held_past_the_busy_timeout_is_503(cluster, tmp_path):
    url = fresh_postgresql_database(cluster.url, "prefs_lock")
    try:
        _, seeded = seed(url, tmp_path / "instance", ["ann@example.com"])
        link = Tokens(TEST_KEYS).unsubscribe(seeded.public_ids[0], "news")
        service = Service(url, tmp_path, PREFS_WORKERS="1", PREFS_DB_BUSY_TIMEOUT_MS="500").start()
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                # another session (a migration, an operator's psql) holds the subscriber's row
                conn.execute(text("SELECT 1 FROM subscribers FOR UPDATE"))
                held = timed(
                    service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM, timeout=20
                )
                conn.rollback()
            released = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
        finally:
            engine.dispose()
            service.stop()
    finally:
        drop_postgresql_database(url)
    report(
        "PostgreSQL row lock past the busy timeout",
        2,
        int(released.status == 200),
        0,
        int(held.status == 503),
        f"postgresql lock: held past the 0.5 s busy timeout answered {held.status} in {held.elapsed:.2f} s, "
        f"then {released.status} once released",
    )
    assert_refused_well(held, "page")
    assert released.status == 200


def hold_sqlite_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    """Start another process that holds SQLite's write lock for ``seconds``."""
    script = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "c.rollback()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_a_sqlite_lock_held_past_the_busy_timeout_is_503_not_500(tmp_path):
    path = tmp_path / "locked.sqlite3"
    url = f"sqlite:///{path}"
    _, seeded = seed(url, tmp_path / "instance", ["ann@example.com"])
    tokens = Tokens(TEST_KEYS)
    link = tokens.unsubscribe(seeded.public_ids[0], "news")
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    event = json.dumps({"events": [{"type": "unsubscribe", "email": "ann@example.com"}]}).encode()
    service = Service(url, tmp_path, PREFS_WORKERS="1", PREFS_DB_BUSY_TIMEOUT_MS="300").start()
    try:
        holder = hold_sqlite_lock(path, 4)
        try:
            page = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
            api_call = timed(service.base, "POST", "/api/v1/events", body=event, headers=api)
            # readers are not writers: in WAL mode the pages still open
            reading = timed(service.base, "GET", f"/p/{tokens.preferences(seeded.public_ids[0])}")
        finally:
            holder.wait(10)
            holder.stdout.close()
        released = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
    finally:
        log = service.log()
        service.stop()
    report(
        "SQLite lock past the busy timeout",
        4,
        int(reading.status == 200) + int(released.status == 200),
        0,
        int(page.status == 503) + int(api_call.status == 503),
        f"sqlite lock: writes answered {page.status} (page) and {api_call.status} (API) in "
        f"{max(page.elapsed, api_call.elapsed):.2f} s, reads {reading.status}, "
        f"{released.status} once released",
    )
    assert_refused_well(page, "page")
    assert_refused_well(api_call, "api")
    assert page.headers.get("retry-after") and reading.status == 200
    assert released.status == 200
    assert "Traceback" not in log
