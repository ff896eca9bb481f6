"""Many writers on one subscriber, and overlapping new recipients, on real gunicorn workers."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode, urlsplit

import pytest
from sqlalchemy import create_engine, select

from prefs.domain import ledger
from prefs.domain.tokens import Tokens
from prefs.models import Event, Subscriber
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

WRITES = 500
WRITERS = 16
ANN = "ann@example.com"


def writes(
    tokens: Tokens, public_id: str, api_key: str
) -> list[tuple[str, bool, str, str, bytes, dict[str, str]]]:
    """Return 500 writes to ann's ``news``, each with its own campaign id: (id, subscribe, ...)."""
    rng = random.Random(6)
    made = []
    for n in range(WRITES):
        campaign = f"w{n:04d}"
        link = tokens.unsubscribe(public_id, "news", campaign)
        # the page's undo needs the form its own click returned: test_undo_races covers it
        kind = rng.choice(("one-click", "page", "preferences", "api"))
        if kind == "one-click":
            subscribe, path, body, headers = False, f"/u/{link}", ONE_CLICK_BODY.encode(), FORM
        elif kind == "page":
            subscribe, path, body, headers = False, f"/u/{link}", urlencode({"scope": "link"}).encode(), FORM
        elif kind == "preferences":
            subscribe = rng.random() < 0.5
            form = [("action", "save")] + ([("topic", "news")] if subscribe else [])
            path, body, headers = f"/p/{link}", urlencode(form).encode(), FORM
        else:
            subscribe = rng.random() < 0.5
            event = {
                "type": "resubscribe" if subscribe else "unsubscribe",
                "email": ANN,
                "topic": "news",
                "campaign": campaign,
            }
            path = "/api/v1/events"
            body = json.dumps({"events": [event]}).encode()
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        made.append((campaign, subscribe, kind, path, body, headers))
    return made


def test_sixteen_writers_on_one_subscriber_keep_one_event_per_change(service_database, tmp_path):
    app, seeded = seed(service_database, tmp_path / "instance", [ANN])
    planned = writes(Tokens(TEST_KEYS), seeded.public_ids[0], seeded.api_key)
    service = Service(service_database, tmp_path, PREFS_WORKERS="4", PREFS_THREADS="4").start()
    outcomes: dict[str, Outcome] = {}
    lock = threading.Lock()
    shares = [planned[i::WRITERS] for i in range(WRITERS)]

    def writer(share: list[tuple[str, bool, str, str, bytes, dict[str, str]]]) -> None:
        deadline = time.monotonic() + 120
        for campaign, _, _, path, body, headers in share:
            if time.monotonic() > deadline:
                return
            outcome = timed(service.base, "POST", path, body=body, headers=headers)
            with lock:
                outcomes[campaign] = outcome

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            list(pool.map(writer, shares))
        log = service.log()
    finally:
        service.stop()

    statuses = Counter(o.status for o in outcomes.values())
    acknowledged = {c for c, o in outcomes.items() if o.status in (200, 303)}
    server_errors = sum(n for s, n in statuses.items() if s is None or s >= 500)
    engine = create_engine(service_database)
    with engine.connect() as conn:
        trail = conn.execute(
            select(Event.action, Event.campaign, Event.source)
            .where(Event.topic_id.is_not(None))
            .order_by(Event.id)
        ).all()
    engine.dispose()
    with app.app_context():
        from prefs.extensions import db

        final = ledger.verdict_for(db.session(), ANN, "news")
        db.session.remove()
        db.engine.dispose()

    by_campaign = {campaign: (subscribe, kind) for campaign, subscribe, kind, *_ in planned}
    api_changed = {
        c
        for c, o in outcomes.items()
        if by_campaign[c][1] == "api" and json.loads(o.body)["results"][0]["changed"]
    }
    report(
        "16 writers, one subscriber",
        WRITES,
        len(acknowledged),
        0 if trail and final.allowed == (trail[-1].action == "resubscribe") else 1,
        server_errors,
        f"same subscriber: {WRITES} writes by {WRITERS} clients, {len(acknowledged)} acknowledged, "
        f"{len(trail)} changes, {len(trail)} audit events, {server_errors} 5xx",
    )
    assert statuses.keys() <= {200, 303}, statuses
    assert len(acknowledged) == WRITES
    assert "Traceback" not in log and "IntegrityError" not in log
    # exactly one audit event per acknowledged change: each names the write that made it
    campaigns = [e.campaign for e in trail]
    assert len(campaigns) == len(set(campaigns)) and set(campaigns) <= acknowledged
    # every event is a real change: they alternate, starting from the topic's default (in)
    assert [e.action for e in trail] == [("unsubscribe", "resubscribe")[i % 2] for i in range(len(trail))]
    for event in trail:
        subscribe, _ = by_campaign[event.campaign]
        assert event.action == ("resubscribe" if subscribe else "unsubscribe")
    # the API says which of its writes changed something; the audit trail agrees exactly
    assert api_changed == {e.campaign for e in trail if e.source == "api"}
    # the final state is the last recorded change's
    assert trail and final.allowed == (trail[-1].action == "resubscribe")
    assert len(trail) >= 20  # interleaved writers did change the state, many times


CALLS = 8
NEW = 1000


def test_overlapping_checks_create_each_new_recipient_once(service_database, tmp_path):
    _, seeded = seed(service_database, tmp_path / "instance", [])
    universe = [f"new{i}@example.com" for i in range(NEW)]
    rng = random.Random(3)
    batches = [rng.sample(universe, 600) for _ in range(CALLS)]
    batches[0] = universe[: NEW // 2] + batches[0][:100]
    batches[1] = universe[NEW // 2 :] + batches[1][:100]  # every address is in some call
    service = Service(service_database, tmp_path, PREFS_WORKERS="4", PREFS_THREADS="4").start()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    barrier = threading.Barrier(CALLS)

    def call(batch: list[str]) -> Outcome:
        body = json.dumps({"topic": "news", "recipients": batch}).encode()
        barrier.wait(30)
        return timed(service.base, "POST", "/api/v1/check", body=body, headers=headers, timeout=60)

    try:
        with ThreadPoolExecutor(CALLS) as pool:
            outcomes = list(pool.map(call, batches))
    finally:
        service.stop()
    engine = create_engine(service_database)
    with engine.connect() as conn:
        stored = dict(conn.execute(select(Subscriber.email, Subscriber.public_id)).all())
    engine.dispose()

    server_errors = sum(1 for o in outcomes if o.status is None or o.status >= 500)
    seen: dict[str, set[str]] = {}
    for batch, outcome in zip(batches, outcomes, strict=True):
        assert outcome.status == 200, (outcome.status, outcome.error, outcome.body[:300])
        results = json.loads(outcome.body)["results"]
        assert [r["email"] for r in results] == batch
        for result in results:
            assert result["allowed"] is True
            for url in (result["unsubscribe_url"], result["preferences_url"]):
                public_id = urlsplit(url).path.split("/")[2].split(".")[0]
                seen.setdefault(result["email"], set()).add(public_id)
    inconsistent = [a for a, ids in seen.items() if ids != {stored.get(a)}]
    report(
        "8 overlapping checks, 1,000 new",
        CALLS,
        sum(1 for o in outcomes if o.status == 200),
        len(inconsistent),
        server_errors,
        f"overlapping checks: {CALLS} calls, {sum(len(b) for b in batches)} recipients, {NEW} new addresses, "
        f"{len(stored)} subscribers, {len(inconsistent)} inconsistent links, {server_errors} 5xx",
    )
    assert server_errors == 0
    assert sorted(stored) == sorted(universe)
    assert not inconsistent
