"""Answer a data subject: everything held about an address, or its erasure."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ...errors import UnknownSubscriber
from ...models import DataRequest, ErasedAddress, Event, Preference, Subscriber, Topic, iso_time, utcnow
from ...store import run_committed
from ..address_forms import scrub
from ..changes import Origin
from ..ledger import find_subscriber, history, insert_for, txid_for
from ..privacy import address_fingerprint, fingerprint_key
from . import purge

ERASED_LABEL = "erased"


def export_subject(session: Session, email: str) -> dict[str, Any]:
    """Return everything held about a normalized address: an access request's answer."""
    subscriber = find_subscriber(session, email)
    if subscriber is None:
        raise UnknownSubscriber("nothing is held about this address")
    preferences = session.execute(
        select(Topic.key, Preference.subscribed, Preference.source, Preference.updated_at)
        .join(Topic, Topic.id == Preference.topic_id)
        .where(Preference.subscriber_id == subscriber.id)
        .order_by(Topic.key)
    )
    fingerprint = address_fingerprint(fingerprint_key(session), email)
    requests = session.scalars(
        select(DataRequest).where(DataRequest.fingerprint == fingerprint).order_by(DataRequest.id)
    )
    return {
        "subscriber": {
            "email": subscriber.email,
            "public_id": subscriber.public_id,
            "created_at": iso_time(subscriber.created_at),
            "left_all_marketing": subscriber.left_all_reason is not None,
            "left_all_reason": subscriber.left_all_reason,
            "left_all_at": iso_time(subscriber.left_all_at),
            "hard_bounce_at": iso_time(subscriber.bounced_at),
        },
        "preferences": [
            {"topic": key, "subscribed": subscribed, "source": source, "updated_at": iso_time(at)}
            for key, subscribed, source, at in preferences
        ],
        "events": [
            {
                "action": event.action,
                "topic": key,
                "reason": event.reason,
                "source": event.source,
                "campaign": event.campaign,
                "client_fingerprint": event.fingerprint,
                "at": iso_time(event.created_at),
            }
            for event, key in history(session, subscriber)
        ],
        "requests": [
            {
                "type": item.type,
                "received_at": iso_time(item.received_at),
                "due_at": iso_time(item.due_at),
                "completed_at": iso_time(item.completed_at),
            }
            for item in requests
        ],
    }


def erase_subject(session: Session, email: str, origin: Origin | None = None) -> None:
    """Erase a normalized address and all that identifies the person; keep it out of marketing.

    What stays is a keyed, non-reversible fingerprint of the address, so a later check
    answers ``erased`` and a re-import does not bring it back; the audit events with
    their personal fields removed; and one event recording the erasure itself.
    """
    fingerprint = address_fingerprint(fingerprint_key(session), email)
    origin = origin or Origin("api")
    run_committed(session, lambda: _erase(session, email, fingerprint, origin))
    purge.after_forgetting(session)


def _erase(session: Session, email: str, fingerprint: str, origin: Origin) -> None:
    # the subscriber's row first, then what hangs on it: the ledger's lock order
    subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email).with_for_update())
    if subscriber_id is None:
        raise UnknownSubscriber("nothing is held about this address")
    forget_address(session, email, fingerprint)
    session.execute(
        update(Event).where(Event.subscriber_id == subscriber_id).values(subscriber_id=None, fingerprint=None)
    )
    session.execute(delete(Preference).where(Preference.subscriber_id == subscriber_id))
    session.execute(delete(Subscriber).where(Subscriber.id == subscriber_id))
    session.execute(
        insert_for(session)(Event).values(
            txid=txid_for(session),
            subscriber_id=None,
            topic_id=None,
            action="erase",
            reason=None,
            source=origin.source,
            created_at=utcnow(),
        )
    )


def forget_address(session: Session, email: str, fingerprint: str) -> None:
    """Within a write transaction: record the fingerprint as erased and drop the address from requests."""
    session.execute(
        insert_for(session)(ErasedAddress)
        .values(fingerprint=fingerprint, erased_at=utcnow())
        .on_conflict_do_nothing(index_elements=[ErasedAddress.fingerprint])
    )
    for item in session.scalars(select(DataRequest).where(DataRequest.fingerprint == fingerprint)):
        item.email = None
        item.label = ERASED_LABEL
        # an operator's note may quote the address, in any form
        item.note = scrub(item.note or "", email)
