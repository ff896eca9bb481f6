"""The operator's figures agree with the ledger and with the one verdict."""

import random
from datetime import timedelta

from sqlalchemy import event, update

from prefs.domain import ledger, overview, topics
from prefs.domain.changes import Origin
from prefs.models import Event, utcnow
from tests.factories import make_subscriber, make_topic


def test_opt_outs_per_day_one_series_per_topic(session):
    make_topic(session, "news", name="Company news")
    ann, bob = make_subscriber(session, "ann@example.com"), make_subscriber(session, "bob@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click"))
    ledger.record_opt_out(session, bob.public_id, "news", Origin("page"))
    ledger.record_opt_out(session, bob.public_id, None, Origin("page"))
    now = utcnow()
    # one of them happened three days ago, one long ago (outside the window)
    session.execute(update(Event).where(Event.id == 1).values(created_at=now - timedelta(days=3)))
    session.execute(update(Event).where(Event.id == 2).values(created_at=now - timedelta(days=200)))
    session.commit()
    days, series = overview.opt_outs_per_day(session, 90, now)
    assert len(days) == 90 and days[-1] == now.date()
    assert list(series) == ["All marketing", "Company news"]
    assert sum(series["Company news"]) == 1 and series["Company news"][-4] == 1
    assert series["All marketing"][-1] == 1
    assert overview.opt_outs_by_source(session, 90, now) == {"one-click": 1, "page": 1}


def test_audiences_agree_with_the_verdict(session):
    rng = random.Random(7)
    keys = ["news", "events", "deals"]
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    make_topic(session, "deals")
    people = [make_subscriber(session, f"p{i}@example.com") for i in range(40)]
    for person in people:
        for _ in range(rng.randrange(5)):
            key = rng.choice([*keys, None])
            if rng.random() < 0.5:
                ledger.record_opt_out(
                    session,
                    person.public_id,
                    key,
                    Origin("page"),
                    reason=rng.choice(["unsubscribed", "complained"]),
                )
            else:
                ledger.record_resubscribe(session, person.public_id, key, Origin("preferences"))
    figures = {a.key: a for a in overview.audiences(session)}
    for key in keys:
        expected = sum(ledger.verdict_for(session, p.email, key).allowed for p in people)
        assert figures[key].receiving == expected, key
    topic_ids = {t.key: t.id for t in topics.list_topics(session)}
    assert set(figures) == set(topic_ids)


def test_topic_pages_hold_each_topic_once(session):
    for i in range(7):
        make_topic(session, f"t{i}", opt_in=i % 2 == 0)
    seen, cursor = [], None
    for number in range(10):
        page = overview.audience_page(session, cursor, 3)
        seen += [a.key for a in page.items]
        make_topic(session, f"new{number}")
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen[:7] == [f"t{i}" for i in range(7)]
    assert len(seen) == len(set(seen)) and set(seen) <= {f"t{i}" for i in range(7)} | {
        f"new{i}" for i in range(10)
    }


def test_the_overview_reads_counts_and_pages_never_whole_tables(app, client, session):
    from prefs.domain import keys

    make_topic(session, "news", name="Company news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="c1"))
    secret = keys.create_key(session, "ops", ["admin"])[1]
    statements = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(" ".join(statement.split()))

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for path in (
            "/admin",
            "/admin/charts/opt-outs.svg",
            "/admin/charts/sources.svg",
            "/admin/topics",
            "/admin/campaigns",
            "/admin/requests",
            "/admin/requests?status=done",
        ):
            assert client.get(path, auth=("ops", secret)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    read = " ".join(statements).lower()
    # the figures come from the running counts; no statement reads the audit trail or the people
    for table in ("from events", "join events", "from subscribers", "join subscribers", "from preferences"):
        assert table not in read, table
    # every list is bounded: each statement that reads a list has a LIMIT
    for statement in statements:
        lowered = statement.lower()
        if "from requests" in lowered or ("from campaign_sends" in lowered and "group by" not in lowered):
            assert " limit " in lowered, statement
