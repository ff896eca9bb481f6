"""Export and erasure of a data subject."""

import pytest
from sqlalchemy import text

from prefs import imports, ledger, subjects
from prefs.errors import UnknownSubscriber
from prefs.extensions import Base
from prefs.ledger import Origin
from tests.factories import make_subscriber, make_topic


def database_text(session):
    """Return every value of every table, as one text, to search for what must be gone."""
    parts = []
    for table in Base.metadata.sorted_tables:
        for row in session.execute(text(f'SELECT * FROM "{table.name}"')):
            parts.append(" ".join(str(v) for v in row))
    return "\n".join(parts)


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
