"""Data subjects: export everything held about an address, and erase it for good."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from .addresses import mask
from .db import write_transaction
from .errors import UnknownSubscriber
from .ledger import find_subscriber, history, insert_for
from .models import ErasedAddress, Event, Preference, Request, Subscriber, Topic, utcnow
from .privacy import address_fingerprint, fingerprint_key

ERASED_LABEL = "erased"


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def export_subject(session: Session, email: str) -> dict[str, Any]:
    """Return everything held about a normalized address, or raise ``UnknownSubscriber``."""
    subscriber = find_subscriber(session, email)
    if subscriber is None:
        raise UnknownSubscriber("nobody is on file with this address")
    preferences = session.execute(
        select(Preference, Topic.key)
        .join(Topic, Topic.id == Preference.topic_id)
        .where(Preference.subscriber_id == subscriber.id)
        .order_by(Topic.key)
    )
    fingerprint = address_fingerprint(fingerprint_key(session), email)
    requests = session.scalars(select(Request).where(Request.fingerprint == fingerprint).order_by(Request.id))
    return {
        "subscriber": {
            "email": subscriber.email,
            "public_id": subscriber.public_id,
            "created_at": _time(subscriber.created_at),
            "left_all_marketing": {
                "reason": subscriber.left_all_reason,
                "at": _time(subscriber.left_all_at),
            }
            if subscriber.left_all_reason
            else None,
            "bounced_at": _time(subscriber.bounced_at),
        },
        "preferences": [
            {
                "topic": key,
                "subscribed": pref.subscribed,
                "source": pref.source,
                "updated_at": _time(pref.updated_at),
            }
            for pref, key in preferences
        ],
        "events": [
            {
                "action": event.action,
                "topic": key or "all",
                "reason": event.reason,
                "source": event.source,
                "campaign": event.campaign,
                "client_fingerprint": event.fingerprint,
                "at": _time(event.created_at),
            }
            for event, key in history(session, subscriber)
        ],
        "requests": [
            {
                "type": item.type,
                "received_at": _time(item.received_at),
                "due_at": _time(item.due_at),
                "completed_at": _time(item.completed_at),
            }
            for item in requests
        ],
    }


def erase_subject(session: Session, email: str) -> None:
    """Erase a normalized address; keep only its keyed fingerprint, which keeps it out of marketing.

    The subscriber and its preferences are deleted, its audit events lose their
    personal fields, and the request register forgets the address.  Raises
    ``UnknownSubscriber`` when nobody is on file with this address.
    """
    fingerprint = address_fingerprint(fingerprint_key(session), email)
    with write_transaction(session):
        subscriber_id = session.scalar(select(Subscriber.id).where(Subscriber.email == email))
        if subscriber_id is None:
            raise UnknownSubscriber("nobody is on file with this address")
        forget_address(session, email, fingerprint)
        session.execute(
            update(Event)
            .where(Event.subscriber_id == subscriber_id)
            .values(subscriber_id=None, fingerprint=None)
        )
        session.execute(delete(Preference).where(Preference.subscriber_id == subscriber_id))
        session.execute(delete(Subscriber).where(Subscriber.id == subscriber_id))


def forget_address(session: Session, email: str, fingerprint: str) -> None:
    """Within a write transaction: record the fingerprint as erased and drop the address from requests."""
    session.execute(
        insert_for(session)(ErasedAddress)
        .values(fingerprint=fingerprint, erased_at=utcnow())
        .on_conflict_do_nothing(index_elements=[ErasedAddress.fingerprint])
    )
    for item in session.scalars(select(Request).where(Request.fingerprint == fingerprint)):
        item.email = None
        item.label = ERASED_LABEL
        # an operator's note may quote the address
        item.note = re.sub(re.escape(email), mask(email), item.note or "", flags=re.IGNORECASE)
