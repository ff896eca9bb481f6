"""The register of data-subject requests, each due 30 days after it was received.

The raw address is kept only while a request is open, to act on it; every request
keeps the address's keyed fingerprint and a masked label, so the register still
proves what was asked and when it was answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, tuple_
from sqlalchemy.orm import Session

from ...errors import Conflict, InvalidValue, UnknownRequest, UnknownSubscriber
from ...models import DataRequest, utcnow
from ...store import write_transaction
from .. import cursors
from ..address_forms import scrub
from ..addresses import mask, normalize
from ..changes import Origin
from ..ledger import ensure_subscriber, is_erased, record_opt_out
from ..privacy import address_fingerprint, fingerprint_key
from ..text import check_text
from . import purge, subjects

TYPES = ("access", "rectification", "erasure", "objection")
STATUSES = ("open", "overdue", "done")
DUE_AFTER = timedelta(days=30)
MAX_NOTE = 2000
# an export for an address nobody holds anything about
NOTHING_HELD: dict[str, Any] = {"subscriber": None, "preferences": [], "events": [], "requests": []}


@dataclass(frozen=True, slots=True)
class Completion:
    """A completed request, with the export when it was an access request."""

    request: DataRequest
    export: dict[str, Any] | None = None


def _aware(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise InvalidValue("a time must fall between the years 1 and 9999 in UTC") from None


def _note(note: str | None) -> str:
    note = check_text((note or "").strip(), "note")
    if len(note) > MAX_NOTE:
        raise InvalidValue(f"a note is at most {MAX_NOTE} characters")
    return note


def record_request(
    session: Session,
    type: str,
    email: str,
    received_at: datetime | None = None,
    note: str = "",
    now: datetime | None = None,
) -> DataRequest:
    """Record a request received at ``received_at`` (default now); it is due 30 days later."""
    if type not in TYPES:
        raise InvalidValue(f"a request's type is one of {', '.join(TYPES)}, not {type!r}")
    address = normalize(email)
    now = now or utcnow()
    received = _aware(received_at) if received_at is not None else now
    if received > now + timedelta(minutes=5):
        raise InvalidValue("a request cannot be received in the future")
    note = _note(note)
    fingerprint = address_fingerprint(fingerprint_key(session), address)
    with write_transaction(session):
        item = DataRequest(
            type=type,
            email=address,
            fingerprint=fingerprint,
            label=mask(address),
            received_at=received,
            due_at=received + DUE_AFTER,
            note=note,
        )
        session.add(item)
    return item


def get_request(session: Session, request_id: int) -> DataRequest:
    """Return the request with this id, or raise ``UnknownRequest``."""
    if not 0 < request_id < 2**63:
        # no such row, and SQLite cannot even compare an integer this large
        raise UnknownRequest(f"there is no request {request_id}")
    item = session.get(DataRequest, request_id)
    if item is None:
        raise UnknownRequest(f"there is no request {request_id}")
    return item


@dataclass(frozen=True, slots=True)
class RequestPage:
    """One page of the register, and the cursor of the next (None on the last)."""

    items: list[DataRequest]
    next_cursor: str | None


def request_page(
    session: Session,
    status: str = "open",
    cursor: str | None = None,
    limit: int = 1000,
    now: datetime | None = None,
) -> RequestPage:
    """Return a page of the open (overdue first), overdue, or done (newest first) requests.

    Keyset pages: a request in this status from the first page to the last appears on
    exactly one of them, and one recorded or completed in between on one at most.
    """
    if status not in STATUSES:
        raise InvalidValue(f"status is one of {', '.join(STATUSES)}, not {status!r}")
    position = cursors.decode(cursor, datetime, int) if cursor else None
    query = select(DataRequest)
    if status == "done":
        key = (DataRequest.completed_at, DataRequest.id)
        query = query.where(DataRequest.completed_at.is_not(None)).order_by(*(k.desc() for k in key))
        if position is not None:
            query = query.where(tuple_(*key) < position)
    else:
        key = (DataRequest.due_at, DataRequest.id)
        query = query.where(DataRequest.completed_at.is_(None)).order_by(*key)
        if status == "overdue":
            query = query.where(DataRequest.due_at < (now or utcnow()))
        if position is not None:
            query = query.where(tuple_(*key) > position)
    items = list(session.scalars(query.limit(limit + 1)))
    if len(items) <= limit:
        return RequestPage(items, None)
    last = items[limit - 1]
    moment = last.completed_at if status == "done" else last.due_at
    assert moment is not None
    return RequestPage(items[:limit], cursors.encode(moment, last.id))


def each_request(
    session: Session, status: str = "open", now: datetime | None = None
) -> Iterator[DataRequest]:
    """Yield every request of a status, a page at a time."""
    now = now or utcnow()
    cursor: str | None = None
    while True:
        page = request_page(session, status, cursor, 1000, now)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def count_requests(session: Session, now: datetime | None = None) -> tuple[int, int]:
    """Return how many requests are open, and how many of those are overdue."""
    now = now or utcnow()
    row = session.execute(
        select(func.count(), func.coalesce(func.sum(case((DataRequest.due_at < now, 1), else_=0)), 0)).where(
            DataRequest.completed_at.is_(None)
        )
    ).one()
    return int(row[0]), int(row[1])


def complete_request(
    session: Session,
    request_id: int,
    origin: Origin | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> Completion:
    """Act on an open request and close it: export, erase, or take the address out of marketing."""
    item = get_request(session, request_id)
    if item.completed_at is not None:
        raise Conflict(f"request {request_id} was completed already")
    note = _note(note)
    email = item.email
    export: dict[str, Any] | None = None
    outcome = "done"
    if email is None:
        # the address was erased while the request was open: nothing is held any more
        export, outcome = (dict(NOTHING_HELD), "exported") if item.type == "access" else (None, "erased")
    elif item.type == "access":
        export, outcome = _export(session, email), "exported"
    elif item.type == "erasure":
        _erase(session, email, item.fingerprint)
        outcome = "erased"
    elif item.type == "objection":
        outcome = _object(session, email, origin or Origin("api"))
    with write_transaction(session):
        item = get_request(session, request_id)
        item.completed_at = now or utcnow()
        item.outcome = outcome
        item.email = None
        text = (item.note + "\n" + note).strip() if note else item.note
        if email is not None:
            # a done request keeps no address, in whatever form the notes wrote it
            text = scrub(text, email)
        item.note = text[:MAX_NOTE]
    purge.after_forgetting(session)
    return Completion(item, export)


def _export(session: Session, email: str) -> dict[str, Any]:
    try:
        return subjects.export_subject(session, email)
    except UnknownSubscriber:
        return dict(NOTHING_HELD)


def _erase(session: Session, email: str, fingerprint: str) -> None:
    try:
        subjects.erase_subject(session, email)
    except UnknownSubscriber:
        # nothing held, but the promise still holds: keep the address out of marketing
        with write_transaction(session):
            subjects.forget_address(session, email, fingerprint)


def _object(session: Session, email: str, origin: Origin) -> str:
    if is_erased(session, email):
        return "already erased"
    subscriber = ensure_subscriber(session, email)
    record_opt_out(session, subscriber.public_id, None, origin, reason="unsubscribed")
    return "unsubscribed"
