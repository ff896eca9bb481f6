"""Writers that lock many subscribers at once: batches of events, one-clicks and forms together.

Every writer locks subscriber rows in one global order (``prefs/ledger.py`` says which),
so on PostgreSQL none of them deadlocks another; a deadlock or serialization failure a
foreign transaction causes is retried before anything answers 503.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import create_engine, func, make_url, select, text

from prefs.domain.tokens import Tokens
from prefs.models import Event
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

SUBSCRIBERS = 2000
SENDERS = 6
BATCHES = 60
EVENTS = 100
TOPICS = [f"t{n}" for n in range(16)]


def deadlocks(database_url: str) -> int | None:
    """Return how many deadlocks PostgreSQL counted in this database (None on SQLite)."""
    if not database_url.startswith("postgresql"):
        return None
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT deadlocks FROM pg_stat_database WHERE datname = :name"),
                    {"name": make_url(database_url).database},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def api_events_by_campaign(database_url: str) -> Counter[str]:
    """Return how many audit events each campaign id has."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Event.campaign, func.count())
                .where(Event.campaign.is_not(None))
                .group_by(Event.campaign)
            ).all()
    finally:
        engine.dispose()
    return Counter({campaign: count for campaign, count in rows})


def distinct_batches(rng: random.Random) -> list[list[dict[str, Any]]]:
    """Return 60 batches of 100 events, each about 100 distinct subscribers in a random order.

    A subscriber's k-th event leaves topic ``t<k>``: every event is a change, so each
    must be on file exactly once.
    """
    seen: Counter[int] = Counter()
    batches = []
    for b in range(BATCHES):
        batch = []
        for n in rng.sample(range(SUBSCRIBERS), EVENTS):
            topic = TOPICS[seen[n]]
            seen[n] += 1
            batch.append(
                {"type": "unsubscribe", "email": f"s{n}@example.com", "topic": topic, "campaign": f"b{b}e{n}"}
            )
        batches.append(batch)
    return batches


def post_batches(base: str, api_key: str, batches: list[list[dict[str, Any]]]) -> list[Outcome]:
    """Post the batches from six senders at once; return each batch's outcome, in order."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
    outcomes: list[Outcome | None] = [None] * len(batches)
    barrier = threading.Barrier(SENDERS)

    def sender(first: int) -> None:
        barrier.wait(30)
        deadline = time.monotonic() + 120
        for index in range(first, len(batches), SENDERS):
            if time.monotonic() > deadline:
                return
            body = json.dumps({"events": batches[index]}).encode()
            outcomes[index] = timed(base, "POST", "/api/v1/events", body=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(sender, range(SENDERS)))
    return [o if o is not None else Outcome(None, 0, 0, "not sent") for o in outcomes]


def test_batches_of_events_from_six_senders_never_deadlock(service_database, tmp_path):
    addresses = [f"s{n}@example.com" for n in range(SUBSCRIBERS)]
    _, seeded = seed(service_database, tmp_path / "instance", addresses, ["news", *TOPICS])
    batches = distinct_batches(random.Random(19))
    service = Service(service_database, tmp_path).start()
    before = deadlocks(service_database)
    try:
        outcomes = post_batches(service.base, seeded.api_key, batches)
        log = service.log()
    finally:
        service.stop()  # the workers' connections close: their statistics are flushed
    after = deadlocks(service_database)
    on_file = api_events_by_campaign(service_database)

    statuses = Counter(o.status for o in outcomes)
    server_errors = sum(n for s, n in statuses.items() if s is None or s >= 500)
    answered = [json.loads(o.body)["results"] for o in outcomes if o.status == 200]
    changed = sum(1 for results in answered for r in results if r == {"status": "accepted", "changed": True})
    wanted = [e["campaign"] for batch in batches for e in batch]
    acknowledged = [
        e["campaign"] for batch, o in zip(batches, outcomes, strict=True) if o.status == 200 for e in batch
    ]
    lost = [c for c in acknowledged if on_file[c] != 1]
    counted = None if before is None or after is None else after - before
    report(
        "events batches, 6 senders (deadlocks)",
        len(batches),
        statuses[200],
        len(lost),
        server_errors,
        f"event batches: {len(batches)} of {EVENTS} events by {SENDERS} senders over {SUBSCRIBERS} "
        f"subscribers, {statuses[200]} answered 200, {changed} changes, {sum(on_file.values())} events "
        f"on file, {server_errors} 5xx, deadlocks {'n/a (SQLite)' if counted is None else counted}",
    )
    assert statuses == {200: len(batches)}, (
        statuses,
        [o.body[:200] for o in outcomes if o.status != 200][:3],
    )
    assert changed == len(wanted)
    assert not lost and set(on_file) == set(wanted)
    assert counted in (None, 0), f"{counted} deadlocks"
    assert "Traceback" not in log


HOT = 30
HOT_BATCHES = 120


def hot_batches(rng: random.Random) -> list[list[dict[str, Any]]]:
    """Return 120 batches: the 30 hot subscribers (in or out of ``news``) and 70 others each."""
    seen: Counter[int] = Counter()
    batches = []
    for b in range(HOT_BATCHES):
        batch = []
        for n in rng.sample(range(HOT), HOT) + rng.sample(range(HOT, SUBSCRIBERS), EVENTS - HOT):
            kind, topic = rng.choice(("unsubscribe", "resubscribe")), "news"
            if n >= HOT:
                kind, topic = "unsubscribe", TOPICS[seen[n] % len(TOPICS)]
                seen[n] += 1
            batch.append(
                {"type": kind, "email": f"s{n}@example.com", "topic": topic, "campaign": f"h{b}e{n}"}
            )
        rng.shuffle(batch)
        batches.append(batch)
    return batches


def test_hot_subscribers_shared_by_batches_one_clicks_and_forms_never_deadlock(service_database, tmp_path):
    addresses = [f"s{n}@example.com" for n in range(SUBSCRIBERS)]
    _, seeded = seed(service_database, tmp_path / "instance", addresses, ["news", *TOPICS])
    rng = random.Random(30)
    batches = hot_batches(rng)
    tokens = Tokens(TEST_KEYS)
    hot = seeded.public_ids[:HOT]
    service = Service(service_database, tmp_path, PREFS_RATELIMIT_ONE_CLICK="100000 per minute").start()
    before = deadlocks(service_database)
    done = threading.Event()
    pages: list[tuple[str, str, Outcome]] = []
    lock = threading.Lock()

    def clicker(n: int) -> None:
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            n += 7
            campaign = f"c{n}"
            public_id = hot[n % HOT]
            link = tokens.unsubscribe(public_id, "news", campaign)
            if n % 3:
                outcome = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
                kind = "one-click"
            else:
                form = [("action", "save")] + ([("topic", "news")] if n % 2 else [])
                outcome = timed(service.base, "POST", f"/p/{link}", body=urlencode(form), headers=FORM)
                kind = "form"
            with lock:
                pages.append((kind, campaign, outcome))

    clickers = [threading.Thread(target=clicker, args=(n * 1000,)) for n in range(4)]
    for thread in clickers:
        thread.start()
    try:
        outcomes = post_batches(service.base, seeded.api_key, batches)
        done.set()
        for thread in clickers:
            thread.join(60)
        log = service.log()
    finally:
        done.set()
        service.stop()
    after = deadlocks(service_database)
    on_file = api_events_by_campaign(service_database)

    statuses = Counter(o.status for o in outcomes)
    page_statuses = Counter((kind, o.status) for kind, _, o in pages)
    server_errors = sum(n for s, n in statuses.items() if s is None or s >= 500) + sum(
        n for (_, s), n in page_statuses.items() if s is None or s >= 500
    )
    wrong = []
    for batch, outcome in zip(batches, outcomes, strict=True):
        if outcome.status != 200:
            continue
        for event, result in zip(batch, json.loads(outcome.body)["results"], strict=True):
            if on_file[event["campaign"]] != int(result["changed"]):
                wrong.append((event, result, on_file[event["campaign"]]))
    wrong += [c for kind, c, o in pages if kind == "one-click" and o.status == 200 and on_file[c] > 1]
    counted = None if before is None or after is None else after - before
    acknowledged = statuses[200] + sum(n for (_, s), n in page_statuses.items() if s in (200, 303))
    report(
        "events batches and pages on 30 hot subscribers",
        len(batches) + len(pages),
        acknowledged,
        len(wrong),
        server_errors,
        f"hot subscribers: {len(batches)} batches ({HOT} hot of {EVENTS} each), {len(pages)} one-clicks "
        f"and forms, statuses {dict(statuses)} {dict(page_statuses)}, {len(wrong)} answers the audit "
        f"trail disagrees with, deadlocks {'n/a (SQLite)' if counted is None else counted}",
    )
    assert server_errors == 0, (statuses, page_statuses)
    assert statuses == {200: len(batches)}
    assert set(page_statuses) <= {("one-click", 200), ("form", 303)}
    assert len(pages) >= 20
    assert not wrong, wrong[:5]
    assert counted in (None, 0), f"{counted} deadlocks"
    assert "Traceback" not in log
