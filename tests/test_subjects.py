"""Export and erasure of a data subject."""

import threading
import time

import pytest
from sqlalchemy import create_engine, text

from prefs.domain import imports, ledger
from prefs.domain.changes import Origin
from prefs.domain.compliance import subjects
from prefs.errors import UnknownSubscriber
from prefs.extensions import db
from tests.factories import make_subscriber, make_topic
from tests.tables import database_text


def test_export_holds_the_subscriber_preferences_and_events(session):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(
        session, ann.public_id, "news", Origin("one-click", campaign="c1", fingerprint="f" * 32)
    )
    export = subjects.export_subject(session, "ann@example.com")
    assert export["subscriber"]["email"] == "ann@example.com"
    assert export["subscriber"]["public_id"] == ann.public_id
    assert export["preferences"] == [
        {
            "topic": "news",
            "subscribed": False,
            "source": "one-click",
            "updated_at": export["preferences"][0]["updated_at"],
        }
    ]
    assert export["events"][0]["campaign"] == "c1"
    assert export["events"][0]["client_fingerprint"] == "f" * 32


def test_unknown_addresses_raise(session):
    with pytest.raises(UnknownSubscriber):
        subjects.export_subject(session, "nobody@example.com")
    with pytest.raises(UnknownSubscriber):
        subjects.erase_subject(session, "nobody@example.com")


def test_after_erasure_the_address_is_nowhere_and_stays_out(session, tmp_path):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    public_id = ann.public_id
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page", fingerprint="f" * 32))
    ledger.record_resubscribe(session, ann.public_id, "news", Origin("preferences"))
    subjects.erase_subject(session, "ann@example.com")
    dump = database_text(session)
    assert "ann@example.com" not in dump and public_id not in dump and "f" * 32 not in dump
    assert ledger.verdict_for(session, "ann@example.com", "news").reason == "erased"
    # the audit trail keeps the changes, without the person
    assert session.execute(text("SELECT count(*) FROM events WHERE subscriber_id IS NULL")).scalar() == 3
    # and records that the erasure was done
    assert session.execute(text("SELECT count(*) FROM events WHERE action = 'erase'")).scalar() == 1
    # a re-import does not resurrect it
    path = tmp_path / "list.txt"
    path.write_text("ann@example.com\n")
    with path.open() as f:
        summary = imports.import_file(session, f)
    assert (summary.added, summary.erased) == (0, 1)
    assert "ann@example.com" not in database_text(session)


def test_an_erasure_waits_for_a_change_in_flight_instead_of_deadlocking(app, session, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's writers take turns on one lock: there are no row locks to order")
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page"))
    ann_id = ann.id
    session.commit()
    outcome: list[BaseException | None] = []

    def erase() -> None:
        with app.app_context():
            try:
                subjects.erase_subject(db.session(), "ann@example.com")
                outcome.append(None)
            except Exception as err:  # the outcome under test
                outcome.append(err)

    engine = create_engine(database_url)
    try:
        with engine.connect() as change:
            # a change in flight takes ann's row first, then her preference (ledger._choose)
            change.execute(BUMP, {"id": ann_id})
            eraser = threading.Thread(target=erase)
            eraser.start()
            deadline = time.monotonic() + 10
            while not change.execute(WAITING).scalar() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert change.execute(WAITING).scalar(), "the erasure never waited for the change"
            change.execute(CHOOSE, {"id": ann_id})
            change.commit()
        eraser.join(20)
    finally:
        engine.dispose()
    assert outcome == [None]
    assert ledger.find_subscriber(session, "ann@example.com") is None


BUMP = text("UPDATE subscribers SET version = version + 1 WHERE id = :id")
CHOOSE = text("UPDATE preferences SET subscribed = true, version = version + 1 WHERE subscriber_id = :id")
BUMP = text("UPDATE subscribers SET version = version + 1 WHERE id = :id")
CHOOSE = text("UPDATE preferences SET subscribed = NOT subscribed WHERE subscriber_id = :id")
# another session of this database waiting for a lock
WAITING = text(
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    " AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
)
