"""The unsubscribe page's undo: it reverts exactly the change one click made, while nothing came after.

A click on the page records its opt-out and, when it stopped mail the subscriber was
receiving, returns an ``UndoToken``: the event it recorded, the subscriber's version once it
was recorded, and the choice it replaced. The page's undo form carries it, signed. Undoing
checks, with the subscriber's row locked, that the event is this subscriber's and was made on
the page, and that the subscriber's version has not moved since: every later write for the
subscriber (a change on any surface, a complaint, a bounce, an import, an opt-out repeating
this one, the undo itself) moves it, so the form is stale once anything came after. Then it
puts back exactly what was there.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Delete, Update, delete, select, update
from sqlalchemy.orm import Session

from ..models import Event, Preference, Subscriber
from ..store import bound_lock_waits, write_transaction
from . import ledger
from .changes import RESUBSCRIBE, UNSUBSCRIBE, Origin
from .rules import Category, State, verdict
from .tokens import PriorChoice, UndoToken

# the only reason a page click records, and the only one its undo removes
PAGE_REASON = "unsubscribed"


@dataclass(frozen=True, slots=True)
class Click:
    """What a click on the page did: whether it changed anything, and its undo if it stopped mail."""

    changed: bool
    undo: UndoToken | None


def record_click(session: Session, public_id: str, topic_key: str | None, origin: Origin) -> Click:
    """Record the page's opt-out, committed before it returns; return it with its undo, if any."""
    with write_transaction(session):
        bound_lock_waits(session)
        subscriber_id, _, left_all_version, left_all_reason, bounced = ledger.lock_subscriber(
            session, public_id
        )
        if topic_key is None:
            event_id = ledger.leave_all(session, public_id, PAGE_REASON, origin)
            # undone only back to receiving marketing: an earlier reason for leaving all
            # (and the topics chosen since) is not the click's to restore
            if event_id is None or left_all_reason is not None:
                return Click(event_id is not None, None)
            return Click(True, UndoToken(public_id, event_id, _version(session, subscriber_id), None))
        topic_id, opt_in = ledger.topic_of(session, topic_key)
        row = session.execute(
            select(Preference.subscribed, Preference.version, Preference.source, Preference.updated_at).where(
                Preference.subscriber_id == subscriber_id, Preference.topic_id == topic_id
            )
        ).first()
        before = State(
            False,
            left_all_reason,
            left_all_version,
            None if row is None else bool(row.subscribed),
            None if row is None else row.version,
            None if row is None else row.source,
            bounced,
        )
        receiving = verdict(before, Category(topic_key, opt_in)).allowed
        recorded = ledger.choose(session, public_id, topic_key, False, origin)
        if recorded.event is None or not receiving:
            return Click(recorded.changed, None)
        prior = None if row is None else PriorChoice(row.version, row.source, row.updated_at)
        version = _version(session, subscriber_id)
        return Click(True, UndoToken(public_id, recorded.event, version, topic_key, prior))


def _version(session: Session, subscriber_id: int) -> int:
    version = session.scalar(select(Subscriber.version).where(Subscriber.id == subscriber_id))
    assert version is not None  # the row is locked in this transaction
    return version


def undo(session: Session, ref: UndoToken, origin: Origin) -> bool:
    """Revert the click ``ref`` names if nothing came after it; tell whether it was reverted."""
    with write_transaction(session):
        bound_lock_waits(session)
        # the bump makes the version one more than the click left it, unless something came after
        subscriber_id, version, *_ = ledger.lock_subscriber(session, ref.public_id)
        if version != ref.version + 1:
            return False
        topic_id = None if ref.topic is None else ledger.topic_of(session, ref.topic)[0]
        event = session.execute(
            select(Event.subscriber_id, Event.topic_id, Event.action, Event.source).where(
                Event.id == ref.event_id
            )
        ).first()
        if event is None or tuple(event) != (subscriber_id, topic_id, UNSUBSCRIBE, "page"):
            return False
        if not _restore(session, subscriber_id, topic_id, ref.prior):
            return False
        ledger.record_event(session, subscriber_id, topic_id, ref.topic, RESUBSCRIBE, None, origin)
        return True


def _restore(session: Session, subscriber_id: int, topic_id: int | None, prior: PriorChoice | None) -> bool:
    """Put back what the click replaced, only where its change is what is recorded now."""
    statement: Update | Delete
    if topic_id is None:
        statement = (
            update(Subscriber)
            .where(Subscriber.id == subscriber_id, Subscriber.left_all_reason == PAGE_REASON)
            .values(left_all_reason=None, left_all_version=None, left_all_at=None)
        )
    else:
        # the click's own refusal: off, from the page
        clicked = (
            Preference.subscriber_id == subscriber_id,
            Preference.topic_id == topic_id,
            Preference.subscribed.is_(False),
            Preference.source == "page",
        )
        if prior is None:
            statement = delete(Preference).where(*clicked)
        else:
            statement = (
                update(Preference)
                .where(*clicked)
                .values(
                    subscribed=True, version=prior.version, source=prior.source, updated_at=prior.updated_at
                )
            )
    result = session.execute(statement.execution_options(synchronize_session=False))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
