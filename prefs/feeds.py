"""The suppression list and the change feed, paged by keyset and streamed in constant memory."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, literal_column, select, tuple_
from sqlalchemy.orm import Session

from .errors import InvalidValue
from .ledger import RESUBSCRIBE
from .models import Event, Preference, Subscriber, Topic, iso_time
from .rules import Category, State, reason_for_leaving_all, verdict
from .topics import get_topic

STREAM_BATCH = 5000
# judges "all marketing": a topic no explicit choice names
_ANY_TOPIC = Category("*")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a feed and where the next one starts."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(*parts: int) -> str:
    """Return an opaque cursor for a keyset position."""
    return base64.urlsafe_b64encode(".".join(map(str, parts)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> tuple[int, ...]:
    """Return the keyset position of a cursor, or raise ``InvalidValue``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        parts = tuple(int(p) for p in raw.split("."))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidValue("the cursor is not one this service gave out") from None
    if len(parts) != size or any(p < 0 or p > 2**63 for p in parts):
        raise InvalidValue("the cursor is not one this service gave out")
    return parts


_LEFT_ALL = (
    Subscriber.id,
    Subscriber.email,
    Subscriber.left_all_reason,
    Subscriber.left_all_version,
    Subscriber.left_all_at,
)


def suppressions(
    session: Session, topic_key: str | None, after: int, limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Return the suppressed addresses after subscriber id ``after``, and the id to go on from."""
    if topic_key is None:
        return _all_suppressions(session, after, limit)
    topic = get_topic(session, topic_key)
    category = Category(topic.key, topic.opt_in)
    rows = session.execute(
        select(*_LEFT_ALL, Preference.subscribed, Preference.version, Preference.updated_at)
        .outerjoin(
            Preference,
            (Preference.subscriber_id == Subscriber.id) & (Preference.topic_id == topic.id),
        )
        # candidates only: the verdict below decides who is suppressed
        .where(
            Subscriber.id > after,
            Subscriber.left_all_reason.is_not(None) | Preference.subscribed.is_(False),
        )
        .order_by(Subscriber.id)
        .limit(limit)
    ).all()
    items = []
    for _sid, email, left, left_version, left_at, subscribed, version, updated in rows:
        judged = verdict(State(False, left, left_version, subscribed, version), category)
        if judged.allowed:
            continue
        if judged.reason == "unsubscribed":
            items.append(_suppression(email, topic.key, "unsubscribed", updated))
        else:
            items.append(_suppression(email, "all", judged.reason, left_at))
    last = rows[-1][0] if len(rows) == limit else None
    return items, last


def _all_suppressions(session: Session, after: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
    chose_since = exists().where(
        Preference.subscriber_id == Subscriber.id,
        Preference.subscribed.is_(True),
        Preference.version > Subscriber.left_all_version,
    )
    rows = session.execute(
        select(*_LEFT_ALL)
        .where(Subscriber.id > after, Subscriber.left_all_reason.is_not(None), ~chose_since)
        .order_by(Subscriber.id)
        .limit(limit)
    ).all()
    items = []
    for _sid, email, left, left_version, left_at in rows:
        judged = verdict(State(False, left, left_version), _ANY_TOPIC)
        items.append(_suppression(email, "all", judged.reason, left_at))
    last = rows[-1][0] if len(rows) == limit else None
    return items, last


def _suppression(email: str, scope: str, reason: str | None, since: datetime | None) -> dict[str, Any]:
    return {"email": email, "scope": scope, "reason": reason, "since": iso_time(since)}


def suppression_page(session: Session, topic_key: str | None, cursor: str | None, limit: int) -> Page:
    """Return one page of the suppression list."""
    after = decode_cursor(cursor, 1)[0] if cursor else 0
    items, last = suppressions(session, topic_key, after, limit)
    return Page(items, None if last is None else encode_cursor(last))


def stream_suppressions(session: Session, topic_key: str | None) -> Iterator[dict[str, Any]]:
    """Yield the whole suppression list, a batch of rows in memory at a time."""
    if topic_key is not None:
        get_topic(session, topic_key)
    after: int | None = 0
    while after is not None:
        items, after = suppressions(session, topic_key, after, STREAM_BATCH)
        session.commit()  # no snapshot held between batches
        yield from items


def _visible_below(session: Session) -> Any:
    """Return the bound under which every transaction's events are committed or gone."""
    if session.get_bind().dialect.name == "postgresql":
        # a transaction still open may hold a smaller txid than rows already committed;
        # stopping below the oldest open one means no row can appear behind the cursor
        return literal_column("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
    return None


def change_page(session: Session, cursor: str | None, limit: int) -> Page:
    """Return the changes after ``cursor``, in commit-safe order, and the cursor to go on from."""
    txid, event_id = decode_cursor(cursor, 2) if cursor else (0, 0)
    query = (
        select(
            Event.txid,
            Event.id,
            Event.action,
            Event.reason,
            Event.created_at,
            Subscriber.email,
            Topic.key,
        )
        .join(Subscriber, Subscriber.id == Event.subscriber_id)
        .outerjoin(Topic, Topic.id == Event.topic_id)
        .where(tuple_(Event.txid, Event.id) > tuple_(txid, event_id))
        .order_by(Event.txid, Event.id)
        .limit(limit)
    )
    bound = _visible_below(session)
    if bound is not None:
        query = query.where(Event.txid < bound)
    items = []
    for row_txid, row_id, action, reason, at, email, key in session.execute(query):
        txid, event_id = row_txid, row_id
        if action == RESUBSCRIBE:
            change, why = "unsuppressed", None
        elif key is None:
            change, why = "suppressed", reason_for_leaving_all(reason or "unsubscribed")
        else:
            change, why = "suppressed", "unsubscribed"
        items.append(
            {"email": email, "change": change, "scope": key or "all", "reason": why, "at": iso_time(at)}
        )
    # the last page has a cursor too: a mailer resumes from it later
    return Page(items, encode_cursor(txid, event_id))
