"""Whom the request form mails a link for: every address waits for the same lock."""

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from prefs.domain import link_requests, privacy
from prefs.domain.ledger import find_subscriber
from prefs.errors import NotRecorded, UnknownSubscriber
from prefs.extensions import db
from prefs.models import ErasedAddress
from tests.factories import make_subscriber


def statements(engine):
    """Record the statements run on the engine, in order."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, *args):
        seen.append(" ".join(statement.split()))

    return seen, lambda: event.remove(engine, "before_cursor_execute", record)


def test_a_known_address_is_found_and_a_new_one_added(session):
    ann = make_subscriber(session, "ann@example.com")
    assert link_requests.public_id_for(session, "ann@example.com") == ann.public_id
    added = link_requests.public_id_for(session, "new@example.com")
    assert find_subscriber(session, "new@example.com").public_id == added
    assert link_requests.public_id_for(session, "new@example.com") == added  # once


def test_an_erased_address_is_never_brought_back(session):
    key = privacy.fingerprint_key(session)
    session.add(ErasedAddress(fingerprint=privacy.address_fingerprint(key, "gone@example.com")))
    session.commit()
    with pytest.raises(UnknownSubscriber):
        link_requests.public_id_for(session, "gone@example.com")
    assert find_subscriber(session, "gone@example.com") is None


@pytest.mark.parametrize("who", ["known", "new", "erased"])
def test_every_address_takes_the_lock_an_insert_takes_and_reads_the_same_rows(session, who):
    make_subscriber(session, "known@example.com")
    key = privacy.fingerprint_key(session)
    session.add(ErasedAddress(fingerprint=privacy.address_fingerprint(key, "erased@example.com")))
    session.commit()
    seen, stop = statements(db.engine)
    try:
        link_requests.public_id_for(session, f"{who}@example.com")
    except UnknownSubscriber:
        pass
    finally:
        stop()
    lock = "LOCK TABLE subscribers" if db.engine.dialect.name == "postgresql" else "BEGIN IMMEDIATE"
    first = [s for s in seen if not s.startswith("INSERT")][:4]
    assert any(s.startswith(lock) for s in seen[:2]), seen
    assert any("FROM subscribers" in s for s in first) and any("erased_addresses" in s for s in first), seen


def test_a_write_only_a_new_address_needs_that_fails_is_not_recorded(session, monkeypatch):
    make_subscriber(session, "known@example.com")
    real = session.execute

    def refused(statement, *args, **kwargs):
        if str(statement).startswith("INSERT INTO subscribers"):
            raise OperationalError("INSERT", None, OSError(28, "database or disk is full"))
        return real(statement, *args, **kwargs)

    monkeypatch.setattr(session, "execute", refused)
    with pytest.raises(NotRecorded):
        link_requests.public_id_for(session, "new@example.com")
    assert link_requests.public_id_for(session, "known@example.com")  # the known are found as ever
    monkeypatch.undo()
    assert find_subscriber(session, "new@example.com") is None


def test_a_fault_that_meets_every_address_is_raised_as_it_is(session, monkeypatch):
    def down(*args, **kwargs):
        raise OperationalError("SELECT", None, OSError("the database is down"))

    monkeypatch.setattr(session, "execute", down)
    monkeypatch.setattr(session, "scalar", down)
    for email in ("known@example.com", "new@example.com"):
        with pytest.raises(OperationalError):  # answered 503, for every address alike
            link_requests.public_id_for(session, email)
