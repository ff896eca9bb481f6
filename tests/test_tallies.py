"""The running counts agree with a full count of the tables, whoever wrote them and however."""

from __future__ import annotations

import io
import random
import threading
import time
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import Date, and_, case, cast, create_engine, func, select, text
from sqlalchemy.orm import Session

from prefs.domain import campaigns, imports, ledger, overview
from prefs.domain.changes import Change, Origin
from prefs.domain.compliance import requests as register
from prefs.domain.compliance import subjects
from prefs.extensions import db
from prefs.extensions import session as db_session
from prefs.models import (
    Event,
    Preference,
    Subscriber,
    Topic,
    utcnow,
)
from prefs.store import tallies
from tests.factories import (
    bearer,
    make_key,
    make_subscriber,
    make_topic,
    preferences_token,
    unsubscribe_token,
)
from tests.pages import ONE_CLICK
from tests.tables import counts, recounted

KEYS = ("news", "events", "deals")


# the overview's figures as the whole tables say them: the queries the overview ran before the counts


def full_opt_outs_per_day(session: Session, count: int, now: datetime) -> dict[str, list[int]]:
    span = overview.days(now, count)
    if session.get_bind().dialect.name == "postgresql":
        day = cast(func.timezone("UTC", Event.created_at), Date)
    else:
        day = func.date(Event.created_at)
    rows = session.execute(
        select(day, func.coalesce(Topic.name, overview.ALL_MARKETING), func.count())
        .select_from(Event)
        .outerjoin(Topic, Topic.id == Event.topic_id)
        .where(Event.action == ledger.UNSUBSCRIBE)
        .group_by(day, Topic.name)
    )
    index = {d: i for i, d in enumerate(span)}
    series: dict[str, list[int]] = {}
    for value, name, number in rows:
        when = value if isinstance(value, date) else date.fromisoformat(str(value))
        if when in index:
            series.setdefault(name, [0] * count)[index[when]] += number
    return series


def full_opt_outs_by_source(session: Session, first: date) -> dict[str, int]:
    start = datetime.combine(first, datetime.min.time(), tzinfo=UTC)
    rows = session.execute(
        select(Event.source, func.count())
        .where(Event.action == ledger.UNSUBSCRIBE, Event.created_at >= start)
        .group_by(Event.source)
    )
    return dict(rows.all())


def full_audiences(session: Session) -> dict[str, tuple[int, int, int]]:
    everyone, left_all = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Subscriber.left_all_reason.is_not(None), 1), else_=0)), 0),
        )
    ).one()
    stayed = Subscriber.left_all_reason.is_(None)
    chose_again = and_(
        Subscriber.left_all_reason.is_not(None),
        Preference.version > func.coalesce(Subscriber.left_all_version, 0),
    )
    rows = session.execute(
        select(
            Preference.topic_id,
            func.sum(case((and_(stayed, Preference.subscribed), 1), else_=0)),
            func.sum(case((stayed, 1), else_=0)),
            func.sum(case((and_(chose_again, Preference.subscribed), 1), else_=0)),
            func.sum(case((Preference.subscribed, 1), else_=0)),
            func.sum(case((Preference.subscribed, 0), else_=1)),
        )
        .join(Subscriber, Subscriber.id == Preference.subscriber_id)
        .group_by(Preference.topic_id)
    )
    by_topic = {row[0]: [int(n or 0) for n in row[1:]] for row in rows}
    result = {}
    for topic in session.scalars(select(Topic)):
        on_stayed, with_choice_stayed, on_again, chose, left = by_topic.get(topic.id, [0] * 5)
        without_choice = int(everyone) - int(left_all) - with_choice_stayed
        receiving = on_stayed + on_again + (0 if topic.opt_in else without_choice)
        result[topic.key] = (receiving, chose, left)
    return result


def full_campaign_opt_outs(session: Session) -> dict[str, int]:
    rows = session.execute(
        select(Event.campaign, func.count())
        .where(Event.action == ledger.UNSUBSCRIBE, Event.campaign.is_not(None))
        .group_by(Event.campaign)
    )
    return dict(rows.all())


def assert_figures_add_up(session: Session, people: set[str]) -> None:
    """The counts equal a full count, the overview equals the old whole-table queries and the verdict."""
    session.rollback()
    assert counts(session) == recounted(session)
    now = utcnow()
    days, series = overview.opt_outs_per_day(session, 90, now)
    assert series == {k: v for k, v in full_opt_outs_per_day(session, 90, now).items() if any(v)}
    assert overview.opt_outs_by_source(session, 90, now) == full_opt_outs_by_source(session, days[0])
    figures = {a.key: (a.receiving, a.chose, a.left) for a in overview.audiences(session)}
    assert figures == full_audiences(session)
    for key in KEYS:
        expected = sum(ledger.verdict_for(session, email, key).allowed for email in people)
        assert figures[key][0] == expected, key
    shown = {c.campaign: c.opt_outs for c in campaigns.page(session, None, 1000).items}
    full = full_campaign_opt_outs(session)
    assert {c: n for c, n in shown.items() if n} == {c: n for c, n in full.items() if c in shown}


@pytest.fixture(params=["as written", "all in bulk"])
def counting(request, app, database_url):
    """On PostgreSQL, run a test twice: statements counted as each writer says, then all as sets.

    Asked for before ``session``: the setting needs connections made after it.
    """
    if request.param == "all in bulk":
        if not database_url.startswith("postgresql"):
            pytest.skip("SQLite counts row by row only")
        setting(f"SET {tallies.BULK_SETTING} = 'on'")
    yield request.param
    if request.param == "all in bulk":
        setting(f"RESET {tallies.BULK_SETTING}")


def setting(change: str) -> None:
    """Change a setting of the test's database for every connection made from now on."""
    db.session.remove()
    with db.engine.begin() as conn:
        conn.execute(text(f'ALTER DATABASE "{conn.engine.url.database}" {change}'))
    db.engine.dispose()


def test_the_counts_equal_a_full_count_after_a_mixed_history(counting, app, client, session):
    rng = random.Random(19)
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    make_topic(session, "deals")
    admin, send, write = (bearer(make_key(session, scope)) for scope in ("admin", "send", "write"))
    people = {f"p{i}@example.com" for i in range(30)}
    for email in sorted(people):
        make_subscriber(session, email)
    erased: set[str] = set()
    now = utcnow()

    def someone() -> str:
        return rng.choice(sorted(people))

    def subscriber(email: str) -> Subscriber:
        found = ledger.find_subscriber(session, email)
        assert found is not None
        return found

    def done() -> None:
        # the one-click layer writes on a connection of its own: the test's read ends
        db_session().rollback()

    def one_click() -> None:
        token = unsubscribe_token(
            subscriber(someone()), rng.choice([*KEYS, None]), rng.choice(["c1", "c2", None])
        )
        assert client.post(f"/u/{token}", data=ONE_CLICK).status_code == 200

    def page() -> None:
        token = unsubscribe_token(
            subscriber(someone()), rng.choice([*KEYS, None]), rng.choice(["c1", "c3", None])
        )
        form = rng.choice([{"scope": "link"}, {"scope": "all"}])
        assert client.post(f"/u/{token}", data=form).status_code == 200

    def preference_center() -> None:
        token = preferences_token(subscriber(someone()))
        form = (
            {"action": "leave-all"} if rng.random() < 0.2 else {"topic": rng.sample(KEYS, rng.randrange(4))}
        )
        assert client.post(f"/p/{token}", data=form).status_code == 303

    def api_events() -> None:
        batch = []
        for _ in range(rng.randrange(1, 8)):
            kind = rng.choice(["unsubscribe", "resubscribe", "complaint", "hard_bounce"])
            event = {"type": kind, "email": rng.choice([*people, "stranger@example.org"])}
            if kind in ("unsubscribe", "resubscribe") and rng.random() < 0.7:
                event["topic"] = rng.choice(KEYS)
            if rng.random() < 0.5:
                event["campaign"] = rng.choice(["c1", "c2", "c4"])
            if rng.random() < 0.5:  # reported later: some days ago, some beyond the chart
                event["at"] = (now - timedelta(days=rng.choice([1, 5, 40, 89, 120]), hours=3)).isoformat()
            batch.append(event)
        response = client.post("/api/v1/events", json={"events": batch}, headers=write)
        assert response.status_code == 200
        people.add("stranger@example.org")

    def api_check() -> None:
        fresh = [f"new{rng.randrange(10**6)}@example.net" for _ in range(3)]
        body = {
            "topic": rng.choice(KEYS),
            "campaign": rng.choice(["c1", "c5"]),
            "recipients": [*fresh, someone()],
        }
        assert client.post("/api/v1/check", json=body, headers=send).status_code == 200
        people.update(fresh)

    def import_file() -> None:
        rows = [someone() for _ in range(4)] + [
            f"imported{rng.randrange(10**6)}@example.org" for _ in range(3)
        ]
        rows += [rng.choice(sorted(erased))] if erased else []
        csv = "email,created\n" + "".join(f"{email},{1_700_000_000 + i}\n" for i, email in enumerate(rows))
        imports.import_file(session, io.StringIO(csv), "sendgrid", rng.choice([None, *KEYS]))
        people.update(e for e in rows if e not in erased)

    def erase() -> None:
        email = someone()
        if rng.random() < 0.5:
            assert client.delete(f"/api/v1/subscribers/{email}", headers=admin).status_code in (204, 404)
        else:
            item = register.record_request(session, "erasure", email)
            register.complete_request(session, item.id)
        people.discard(email)
        erased.add(email)

    def objection() -> None:
        item = register.record_request(session, "objection", someone())
        register.complete_request(session, item.id)

    def rejoin() -> None:
        ledger.record_resubscribe(session, subscriber(someone()).public_id, None, Origin("cli"))

    steps = [one_click, page, preference_center, api_events, api_check, import_file, erase, objection, rejoin]
    weights = [6, 4, 3, 5, 2, 2, 1, 1, 2]
    for _round in range(4):
        for _ in range(40):
            rng.choices(steps, weights)[0]()
            done()
        assert_figures_add_up(session, people)
    # the counts of events no longer in the chart's window are kept, and still add up
    assert any(key[0] == "opt_out_tallies" and key[1] < overview.days(now, 90)[0] for key in counts(session))


def test_history_rewritten_by_hand_is_counted_too(counting, session):
    make_topic(session, "news", name="Company news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="c1"))
    # an operator's SQL: moved to another day, then to another source and campaign
    session.execute(text("UPDATE events SET created_at = :at"), {"at": utcnow() - timedelta(days=3)})
    session.execute(text("UPDATE events SET source = 'api', campaign = 'c2'"))
    session.execute(text("UPDATE preferences SET subscribed = :yes"), {"yes": True})
    session.commit()
    assert counts(session) == recounted(session)
    # a topic deleted: its choices go with it, its events count for all marketing
    make_topic(session, "deals")
    ledger.record_opt_out(session, ann.public_id, "deals", Origin("page"))
    session.execute(text("DELETE FROM topics WHERE key = 'deals'"))
    session.commit()
    assert counts(session) == recounted(session)
    session.execute(text("DELETE FROM events"))
    session.execute(text("DELETE FROM subscribers"))
    session.commit()
    assert counts(session) == recounted(session) == {}


def test_a_topic_import_and_an_erasure_move_whole_sets(counting, session):
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    people = [make_subscriber(session, f"p{i}@example.com") for i in range(50)]
    ledger.record_many(session, [Change(p.public_id, "events", True, Origin("api")) for p in people[:20]])
    ledger.record_many(session, [Change(p.public_id, None, False, Origin("api")) for p in people[10:30]])
    csv = "".join(f"p{i}@example.com\n" for i in range(0, 60, 2))
    imports.import_file(session, io.StringIO(csv), "auto", "news")
    imports.import_file(session, io.StringIO(csv), "auto", None)
    for person in people[:5]:
        subjects.erase_subject(session, person.email)
    assert counts(session) == recounted(session)
    figures = {a.key: a.receiving for a in overview.audiences(session)}
    # on file: all but the erased, and those the imports added
    emails = [f"p{i}@example.com" for i in [*range(5, 50), *range(50, 60, 2)]]
    for key in ("news", "events"):
        assert figures[key] == sum(ledger.verdict_for(session, e, key).allowed for e in emails)


def test_concurrent_writers_share_no_count_row_and_never_deadlock(make_app, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: its counts have one shard")
    app = make_app(DB_BUSY_TIMEOUT_MS=1000)
    with app.app_context():
        s = db_session()
        news = make_topic(s, "news").id
        people = [make_subscriber(s, f"p{i}@example.com").public_id for i in range(402)]
        deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        deadlocks_before = s.scalar(text(deadlocks))
        s.commit()
        engine = db.engine
    # a transaction that changed the very counts the writers below change stays open
    holder = create_engine(database_url)
    held = holder.connect()
    held.execute(
        text(
            "INSERT INTO events (txid, topic_id, action, source, campaign, created_at)"
            " VALUES (0, :news, 'unsubscribe', 'one-click', 'c1', :now)"
        ),
        {"news": news, "now": utcnow()},
    )
    held.execute(
        text(
            "UPDATE subscribers SET left_all_reason = 'support', left_all_version = version"
            " WHERE public_id = :p"
        ),
        {"p": people[0]},
    )
    held.execute(
        text(
            "INSERT INTO preferences (subscriber_id, topic_id, subscribed, version, source, updated_at)"
            " SELECT id, :news, false, version, 'cli', :now FROM subscribers WHERE public_id = :p"
        ),
        {"news": news, "now": utcnow(), "p": people[1]},
    )
    errors: list[BaseException] = []

    def writer(chunk: list[str], batches: bool) -> None:
        try:
            with app.app_context():
                if batches:
                    for i in range(0, len(chunk), 10):
                        changes = [
                            Change(p, "news", False, Origin("api", campaign="c1")) for p in chunk[i : i + 10]
                        ]
                        ledger.record_many(db_session(), changes)
                    return
                for i, public_id in enumerate(chunk):
                    topic = "news" if i % 3 else None
                    ledger.record_opt_out(engine, public_id, topic, Origin("one-click", campaign="c1"))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(people[2 + i :: 8], i % 2 == 0)) for i in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    held.rollback()
    held.close()
    holder.dispose()
    # nobody waited on the open transaction's counts (the lock timeout is 1 s)
    assert not errors, errors[:3]
    assert elapsed < 30
    with app.app_context():
        s = db_session()
        assert s.scalar(text(deadlocks)) == deadlocks_before
        assert s.scalar(text("SELECT count(DISTINCT shard) FROM audience_tallies")) > 1
        assert counts(s) == recounted(s)
        assert s.scalar(select(func.count()).select_from(Event)) == len(people) - 2


def test_a_recount_while_changes_are_recorded_counts_each_change_once(make_app, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: a recount holds it, nothing is recorded meanwhile")
    app = make_app(DB_BUSY_TIMEOUT_MS=1000)
    with app.app_context():
        s = db_session()
        make_topic(s, "news")
        people = [make_subscriber(s, f"p{i}@example.com").public_id for i in range(40)]
        engine = db.engine
        # the very counts the changes below add to exist already; and some counts drifted
        for public_id in people[:10]:
            ledger.record_opt_out(engine, public_id, "news", Origin("one-click"))
        s.execute(text("DELETE FROM audience_tallies WHERE kind = 'everyone'"))
        s.commit()
    # a recount done and not yet committed: changes go on (the lock timeout is 1 s), and
    # those committed after its snapshot are counted once, by their triggers
    with engine.connect() as conn:
        transaction = conn.begin()
        tallies.recount(conn)
        with app.app_context():
            for public_id in people[10:]:
                ledger.record_opt_out(engine, public_id, "news", Origin("one-click"))
        transaction.commit()
    with app.app_context():
        s = db_session()
        assert counts(s) == recounted(s)
        assert counts(s)[("audience_tallies", 0, "everyone")] == len(people)
