"""The check in the domain: set-based, concurrent-safe, one verdict per recipient."""

import threading

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from prefs.domain import campaigns, checks, ledger
from prefs.domain.addresses import normalize
from prefs.domain.changes import Origin
from prefs.extensions import db
from prefs.extensions import session as current
from prefs.models import LOOKUP_COLUMNS, Subscriber
from tests.factories import make_subscriber, make_topic


def run_check(app, key, recipients, campaign=None):
    with app.app_context():
        answers = checks.check_recipients(
            current(), app.extensions["prefs.tokens"], key, recipients, campaign
        )
        return [
            {
                "email": email,
                "allowed": a.allowed,
                "reason": a.reason,
                "unsubscribe_url": a.unsubscribe_token
                and f"https://prefs.example.com/u/{a.unsubscribe_token}",
            }
            for email, a in answers
        ]


def test_concurrent_checks_sharing_new_recipients_never_fail_or_duplicate(make_app):
    app = make_app()
    with app.app_context():
        make_topic(current(), "news")
    shared = [f"shared{i:03d}@example.com" for i in range(300)]
    answers, errors = [], []

    def worker(n):
        try:
            own = [f"own{n}-{i}@example.com" for i in range(50)]
            answers.append(run_check(app, "news", shared[n * 20 :] + shared[: n * 20] + own))
        except Exception as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with app.app_context():
        assert current().scalar(select(func.count()).select_from(Subscriber)) == 300 + 6 * 50
    # every call got the same public id for a shared address
    ids = {}
    for results in answers:
        for result in results:
            public_id = result["unsubscribe_url"].rsplit("/", 1)[1].split(".")[0]
            assert ids.setdefault(result["email"], public_id) == public_id


def test_the_verdict_comes_from_the_rule_for_each_recipient(app, session):
    make_topic(session, "events", opt_in=True)
    fan = make_subscriber(session, "fan@example.com")
    ledger.record_resubscribe(session, fan.public_id, "events", Origin("page"))
    results = run_check(app, "events", ["fan@example.com", "stranger@example.com"])
    assert [(r["allowed"], r["reason"]) for r in results] == [(True, None), (False, "not_subscribed")]


def test_public_ids_create_new_subscribers_and_skip_erased_ones(app, session):
    from prefs.domain.compliance.subjects import erase_subject

    make_subscriber(session, "gone@example.com")
    erase_subject(session, "gone@example.com")
    ids = checks.ensure_public_ids(session, {"gone@example.com", "new@example.com"})
    assert ids["gone@example.com"] is None
    assert ids["new@example.com"] and len(ids["new@example.com"]) == 16


def test_the_fingerprint_key_is_made_once_under_concurrency(make_app):
    # two hosts making the key at once once failed with a unique violation
    from prefs.domain import privacy

    app = make_app()
    keys, errors = [], []

    def make():
        try:
            with app.app_context():
                keys.append(privacy._create_key(current()))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(set(keys)) == 1


def test_addresses_beyond_ascii_are_found_again_not_made_twice(app, session):
    # the lookup's list travels as one JSON value: what it decodes must equal what is stored
    make_topic(session, "news")
    given = ["ünï@exämple.de", "jörg@bücher.example", "zoë+news@example.com"]
    stored = [normalize(a) for a in given]  # Unicode local parts, A-label domains
    first = checks.ensure_public_ids(session, set(stored))
    ledger.record_opt_out(session, first[stored[1]], "news", Origin("page"))
    assert checks.ensure_public_ids(session, set(stored)) == first
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 3
    results = {r["email"]: r for r in run_check(app, "news", given)}
    assert results["jörg@bücher.example"]["reason"] == "unsubscribed"
    assert results["ünï@exämple.de"]["allowed"] is True
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 3


def test_a_large_check_reads_the_same_with_its_lookups_split(app, session, monkeypatch):
    # on PostgreSQL a helper reads every other chunk on its own connection
    make_topic(session, "news")
    people = [f"p{i:03d}@example.com" for i in range(60)]
    ids = checks.ensure_public_ids(session, set(people))
    for address in people[::3]:
        ledger.record_opt_out(session, ids[address], "news", Origin("page"))
    inline = run_check(app, "news", people)
    monkeypatch.setattr(checks, "CHUNK", 7)
    used = []
    submit = checks._ASIDE.submit

    def spy(*args):
        future = submit(*args)
        used.append(future is not None)
        return future

    monkeypatch.setattr(checks._ASIDE, "submit", spy)
    split = run_check(app, "news", people)
    assert [(r["email"], r["allowed"], r["reason"]) for r in split] == [
        (r["email"], r["allowed"], r["reason"]) for r in inline
    ]
    assert sum(not r["allowed"] for r in split) == 20
    assert used == [session.get_bind().dialect.name == "postgresql"]


def test_one_index_on_the_address_answers_the_lookup(app):
    # the check reads the address's index alone; on PostgreSQL that one index also holds
    # the address unique, so a new subscriber writes one entry keyed on its address
    with app.app_context():
        inspector = inspect(db.engine)
        on_email = [i for i in inspector.get_indexes("subscribers") if i["column_names"][0] == "email"]
        unique = [u["column_names"] for u in inspector.get_unique_constraints("subscribers")]
        if db.engine.dialect.name == "postgresql":
            [index] = on_email
            assert index["unique"] and index["column_names"] == ["email"]
            assert index["dialect_options"]["postgresql_include"] == list(LOOKUP_COLUMNS[1:])
            assert ["email"] not in unique
        else:
            assert [i["column_names"] for i in on_email] == [list(LOOKUP_COLUMNS)]
            assert ["email"] in unique


def test_an_index_being_built_on_the_events_does_not_stop_the_check(make_app, database_url):
    """A migration's CREATE INDEX on events (a SHARE lock) must not hold checks of new addresses."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no table locks: its writers queue for the database")
    app = make_app(DB_BUSY_TIMEOUT_MS=300)
    with app.app_context():
        make_topic(current(), "news")
    engine = create_engine(database_url)
    with engine.connect() as migration:
        migration.execute(text("LOCK TABLE events IN SHARE MODE"))  # what CREATE INDEX holds
        answers = run_check(app, "news", ["new1@example.com", "new2@example.com"], campaign="spring")
        with app.app_context():
            campaigns.count_sent(current(), "spring", "news", 2)
        migration.rollback()
    engine.dispose()
    assert [a["allowed"] for a in answers] == [True, True]
