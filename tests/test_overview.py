"""The operator's figures agree with the ledger and with the one verdict."""

import random
from datetime import timedelta

from sqlalchemy import update

from prefs import ledger, overview, topics
from prefs.ledger import Origin
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
