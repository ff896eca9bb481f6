"""One subscriber's row held locked by another session: only that subscriber's changes wait and fail."""

from __future__ import annotations

import threading
import time
from collections import Counter
from urllib.parse import urlencode

import pytest
from sqlalchemy import create_engine, select, text

from prefs.domain.tokens import Tokens
from prefs.models import Preference, Subscriber
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

BUSY_MS = 4000
NORMAL = 2.0  # a change that needs no held lock answers within this, well under the busy timeout
OTHERS = 24  # unsubscribe-page POSTs and one-clicks, half each, for subscribers nobody holds
LOCKED = 3  # one-clicks and page POSTs for the held subscriber, sent among the others


def send_all(base: str, planned: list[tuple[str, str, str, bytes]]) -> list[tuple[str, str, Outcome]]:
    """Send each (who, kind, path, body) from its own thread, 40 ms apart; return the outcomes."""
    outcomes: list[tuple[str, str, Outcome]] = []
    lock = threading.Lock()

    def send(n: int, who: str, kind: str, path: str, body: bytes) -> None:
        time.sleep(n * 0.04)
        outcome = timed(base, "POST", path, body=body, headers=FORM, timeout=3 * BUSY_MS / 1000)
        with lock:
            outcomes.append((who, kind, outcome))

    threads = [threading.Thread(target=send, args=(n, *p)) for n, p in enumerate(planned)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def plan(tokens: Tokens, held: str, others: list[str]) -> list[tuple[str, str, str, bytes]]:
    """Return the requests: page POSTs and one-clicks for others, the held subscriber's among them."""
    page = urlencode({"scope": "link"}).encode()
    ordered = [("other", "page" if n % 2 else "one-click", public_id) for n, public_id in enumerate(others)]
    for n in range(LOCKED):
        ordered.insert(n * 9, ("held", ("one-click", "page")[n % 2], held))
    requests = []
    for n, (who, kind, public_id) in enumerate(ordered):
        link = tokens.unsubscribe(public_id, "news", f"lock{n}")
        body = ONE_CLICK_BODY.encode() if kind == "one-click" else page
        requests.append((who, kind, f"/u/{link}", body))
    return requests


def out_of_news(database_url: str) -> set[str]:
    """Return the public ids recorded out of ``news``."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(
                conn.scalars(
                    select(Subscriber.public_id)
                    .join(Preference, Preference.subscriber_id == Subscriber.id)
                    .where(Preference.subscribed.is_(False))
                )
            )
    finally:
        engine.dispose()


def test_one_locked_row_fails_only_its_own_changes(service_database, tmp_path):
    if service_database.startswith("sqlite"):
        pytest.skip(
            "SQLite locks the whole database for a writer: a held write lock is an outage for "
            "every write (test_outage.py's SQLite lock test)"
        )
    addresses = [f"row{n}@example.com" for n in range(1 + OTHERS)]
    _, seeded = seed(service_database, tmp_path / "instance", addresses)
    held, others = seeded.public_ids[0], seeded.public_ids[1:]
    planned = plan(Tokens(TEST_KEYS), held, others)
    service = Service(service_database, tmp_path, PREFS_DB_BUSY_TIMEOUT_MS=str(BUSY_MS)).start()
    engine = create_engine(service_database)
    try:
        with engine.connect() as conn:
            # an operator's psql holding the row past the busy timeout
            conn.execute(text("SELECT 1 FROM subscribers WHERE public_id = :p FOR UPDATE"), {"p": held})
            outcomes = send_all(service.base, planned)
            conn.rollback()
        log = service.log()
    finally:
        engine.dispose()
        service.stop()
    recorded = out_of_news(service_database)

    slowest = {who: max(o.elapsed for w, _, o in outcomes if w == who) for who in ("held", "other")}
    theirs = [(kind, o) for who, kind, o in outcomes if who == "other"]
    mine = [(kind, o) for who, kind, o in outcomes if who == "held"]
    acknowledged = [who for who, _, o in outcomes if o.status == 200]
    server_errors = sum(1 for _, _, o in outcomes if o.status is None or o.status >= 500)
    report(
        "one row locked, others' changes",
        len(outcomes),
        len(acknowledged),
        int("held" in acknowledged and held not in recorded),
        server_errors,
        f"one locked row (busy timeout {BUSY_MS / 1000:.0f} s): "
        f"{dict(Counter((who, o.status) for who, _, o in outcomes))}, slowest other "
        f"{slowest['other']:.2f} s, held {', '.join(f'{k} {o.elapsed:.2f} s' for k, o in mine)}",
    )
    assert len(theirs) == OTHERS and len(mine) == LOCKED
    assert "Traceback" not in log
    # everyone else's change is committed and answered as fast as on any other day
    for kind, outcome in theirs:
        assert outcome.status == 200, (kind, outcome.status, outcome.elapsed, outcome.body[:200])
        assert outcome.elapsed < NORMAL, (kind, outcome.elapsed)
    assert set(others) <= recorded
    # the held subscriber's changes fail as an outage does: a 503 after the busy timeout,
    # waited out once (not once more by a second try through the view, nor in a queue of waiters)
    for kind, outcome in mine:
        assert outcome.status == 503, (kind, outcome.status, outcome.body[:200])
        assert outcome.headers.get("retry-after")
        assert outcome.elapsed < 1.5 * BUSY_MS / 1000, (kind, outcome.elapsed)
    assert held not in recorded


def test_many_changes_for_one_locked_row_leave_the_pool_to_the_others(service_database, tmp_path):
    if service_database.startswith("sqlite"):
        pytest.skip("SQLite locks the whole database for a writer: there are no row locks")
    addresses = [f"row{n}@example.com" for n in range(1 + OTHERS)]
    _, seeded = seed(service_database, tmp_path / "instance", addresses)
    held, others = seeded.public_ids[0], seeded.public_ids[1:]
    tokens = Tokens(TEST_KEYS)
    page = urlencode({"scope": "link"}).encode()
    # a mailbox provider's retries and a recipient's clicks on the held row: 16 at once, in one
    # worker whose 16 threads share a pool of 5 connections, among the others' page POSTs
    click = ONE_CLICK_BODY.encode()
    planned = [
        ("held", "one-click", f"/u/{tokens.unsubscribe(held, 'news', f'h{n}')}", click) for n in range(16)
    ]
    for n, public_id in enumerate(others):
        link = tokens.unsubscribe(public_id, "news", f"o{n}")
        planned.insert(2 * n + 1, ("other", "page", f"/u/{link}", page))
    service = Service(
        service_database,
        tmp_path,
        PREFS_WORKERS="1",
        PREFS_THREADS="16",
        PREFS_DB_POOL_SIZE="5",
        PREFS_DB_BUSY_TIMEOUT_MS=str(BUSY_MS),
        PREFS_RATELIMIT_ONE_CLICK="1000 per minute",
    ).start()
    engine = create_engine(service_database)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1 FROM subscribers WHERE public_id = :p FOR UPDATE"), {"p": held})
            outcomes = send_all(service.base, planned)
            conn.rollback()
        log = service.log()
    finally:
        engine.dispose()
        service.stop()
    recorded = out_of_news(service_database)

    theirs = [o for who, _, o in outcomes if who == "other"]
    mine = [o for who, _, o in outcomes if who == "held"]
    server_errors = sum(1 for _, _, o in outcomes if o.status is None or o.status >= 500)
    report(
        "one row locked, 16 changes to it at once",
        len(outcomes),
        sum(1 for o in outcomes if o[2].status == 200),
        0,
        server_errors,
        f"one locked row, 16 changes to it in one worker (16 threads, pool of 5): held "
        f"{dict(Counter(o.status for o in mine))} within {max(o.elapsed for o in mine):.2f} s, others "
        f"{dict(Counter(o.status for o in theirs))} within {max(o.elapsed for o in theirs):.2f} s",
    )
    assert "Traceback" not in log
    for outcome in theirs:
        assert outcome.status == 200, (outcome.status, outcome.elapsed, outcome.body[:200])
        assert outcome.elapsed < NORMAL, outcome.elapsed
    assert set(others) <= recorded
    for outcome in mine:
        assert outcome.status == 503, (outcome.status, outcome.body[:200])
        assert outcome.elapsed < 1.5 * BUSY_MS / 1000, outcome.elapsed


def test_a_locked_topic_fails_only_that_topics_changes(service_database, tmp_path):
    if service_database.startswith("sqlite"):
        pytest.skip("SQLite locks the whole database for a writer: there are no row locks")
    addresses = [f"row{n}@example.com" for n in range(2 * OTHERS)]
    _, seeded = seed(service_database, tmp_path / "instance", addresses, ["news", "offers"])
    tokens = Tokens(TEST_KEYS)
    # one-clicks alternating between the held topic and another, for distinct subscribers
    topic = ("offers", "news")
    planned = [
        (
            ("other", "held")[n % 2],
            "one-click",
            f"/u/{tokens.unsubscribe(pid, topic[n % 2])}",
            ONE_CLICK_BODY.encode(),
        )
        for n, pid in enumerate(seeded.public_ids)
    ]
    service = Service(
        service_database,
        tmp_path,
        PREFS_DB_BUSY_TIMEOUT_MS=str(BUSY_MS),
        PREFS_RATELIMIT_ONE_CLICK="1000 per minute",
    ).start()
    engine = create_engine(service_database)
    try:
        with engine.connect() as conn:
            # a row of topics held FOR UPDATE: every new preference for it waits (its foreign key)
            conn.execute(text("SELECT 1 FROM topics WHERE key = 'news' FOR UPDATE"))
            outcomes = send_all(service.base, planned)
            conn.rollback()
        log = service.log()
    finally:
        engine.dispose()
        service.stop()

    theirs = [o for who, _, o in outcomes if who == "other"]
    mine = [o for who, _, o in outcomes if who == "held"]
    server_errors = sum(1 for _, _, o in outcomes if o.status is None or o.status >= 500)
    report(
        "one topic row locked, other topics' changes",
        len(outcomes),
        sum(1 for o in outcomes if o[2].status == 200),
        0,
        server_errors,
        f"one locked topic: its one-clicks {dict(Counter(o.status for o in mine))} within "
        f"{max(o.elapsed for o in mine):.2f} s, another topic's {dict(Counter(o.status for o in theirs))} "
        f"within {max(o.elapsed for o in theirs):.2f} s",
    )
    assert "Traceback" not in log
    for outcome in theirs:
        assert outcome.status == 200, (outcome.status, outcome.elapsed, outcome.body[:200])
        assert outcome.elapsed < NORMAL, outcome.elapsed
    for outcome in mine:
        assert outcome.status == 503, (outcome.status, outcome.body[:200])
        assert outcome.elapsed < 1.5 * BUSY_MS / 1000, outcome.elapsed
