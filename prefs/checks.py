"""The send-time check: one verdict per recipient, with links, in a bounded number of statements.

The batch is normalized in memory, the known subscribers and their state for the topic
are read in one set-based query per chunk, the new ones are inserted in one statement
per chunk, and ``rules.verdict`` judges each recipient.  No statement is issued per
recipient.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from .addresses import normalize_or_none
from .db import write_transaction
from .ledger import insert_for, new_public_id
from .models import ErasedAddress, Subscriber, utcnow
from .privacy import address_fingerprint, fingerprint_key
from .rules import State, Verdict, suppression, verdict
from .tokens import Tokens
from .topics import resolve

CHUNK = 5000
ONE_CLICK = "List-Unsubscribe=One-Click"
INVALID = suppression("invalid_address")
ERASED_STATE = State(erased=True)


@dataclass(frozen=True, slots=True)
class Known:
    """What one query tells about a subscriber for the topic being checked."""

    public_id: str
    state: State
    bounced: bool


@dataclass(frozen=True, slots=True)
class Links:
    """How generated links are spelled for this deployment."""

    base_url: str
    mailto: str | None = None


def check_recipients(
    session: Session,
    tokens: Tokens,
    links: Links,
    key: str,
    recipients: Sequence[str],
    campaign: str | None = None,
) -> list[dict[str, Any]]:
    """Return one result per recipient, in order, for mail of category ``key``."""
    category, topic = resolve(session, key)
    if campaign is not None:
        tokens.unsubscribe("A" * 16, None, campaign)  # raises InvalidValue for a bad id
    normalized = [normalize_or_none(r) for r in recipients]
    wanted = {n for n in normalized if n is not None}
    known = _known(session, wanted, topic.id if topic else None)
    new = wanted.difference(known)
    if new:
        known.update(_create(session, new, topic.id if topic else None))

    topic_key = None if topic is None else topic.key
    marketing = topic is not None
    results: list[dict[str, Any]] = []
    cache: dict[str, dict[str, Any]] = {}
    for given, address in zip(recipients, normalized, strict=True):
        if address is None:
            results.append(_result(given, INVALID))
            continue
        answer = cache.get(address)
        if answer is None:
            subscriber = known[address]
            if subscriber is None:
                answer = _judged(verdict(ERASED_STATE, category), None, None, None, None)
            else:
                judged: Verdict = verdict(subscriber.state, category)
                token = None
                if judged.allowed:
                    token = tokens.unsubscribe(subscriber.public_id, topic_key, campaign)
                warnings = ["hard_bounce"] if not marketing and subscriber.bounced else None
                answer = _judged(judged, token if marketing else None, token, warnings, links)
            cache[address] = answer
        results.append({"email": given, **answer})
    return results


def _result(given: str, judged: Verdict) -> dict[str, Any]:
    return {
        "email": given,
        "allowed": judged.allowed,
        "reason": judged.reason,
        "unsubscribe_url": None,
        "preferences_url": None,
        "headers": None,
    }


def _judged(
    judged: Verdict,
    unsubscribe_token: str | None,
    preferences_token: str | None,
    warnings: list[str] | None,
    links: Links | None,
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "allowed": judged.allowed,
        "reason": judged.reason,
        "unsubscribe_url": None,
        "preferences_url": None,
        "headers": None,
    }
    if links is not None and preferences_token is not None:
        # one token serves both links: the preference center accepts unsubscribe tokens
        answer["preferences_url"] = f"{links.base_url}/p/{preferences_token}"
    if links is not None and unsubscribe_token is not None:
        url = f"{links.base_url}/u/{unsubscribe_token}"
        answer["unsubscribe_url"] = url
        header = f"<{url}>"
        if links.mailto:
            header += f", <mailto:{links.mailto}?subject=unsubscribe-{unsubscribe_token}>"
        answer["headers"] = {"List-Unsubscribe": header, "List-Unsubscribe-Post": ONE_CLICK}
    if warnings:
        answer["warnings"] = warnings
    return answer


def _emails_match(session: Session, column: Any, name: str) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        # one array parameter instead of thousands of bound values
        return column == func.any(bindparam(name, type_=ARRAY(String)))
    return column.in_(bindparam(name, expanding=True))


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    # sorted: neighbouring keys share index pages, and concurrent inserts lock in one order
    ordered = sorted(values)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]


_KNOWN_SQL = (
    "SELECT s.email, s.public_id, s.left_all_reason, s.left_all_version,"
    " s.bounced_at IS NOT NULL{topic_columns} FROM subscribers s{topic_join} WHERE s.email {match}"
)


def _known(session: Session, emails: set[str], topic_id: int | None) -> dict[str, Known | None]:
    """Read the state of the known subscribers among ``emails``, one query per chunk."""
    # plain driver SQL: the rows need no ORM objects and no per-value type processing
    connection = session.connection()
    postgresql = connection.dialect.name == "postgresql"
    placeholder = "%s" if postgresql else "?"
    topic_columns = topic_join = ""
    if topic_id is not None:
        topic_columns = ", p.subscribed, p.version"
        topic_join = f" LEFT JOIN preferences p ON p.subscriber_id = s.id AND p.topic_id = {int(topic_id)}"
    found: dict[str, Known | None] = {}
    for chunk in _chunks(emails):
        match = f"= ANY({placeholder})" if postgresql else f"IN ({','.join('?' * len(chunk))})"
        sql = _KNOWN_SQL.format(topic_columns=topic_columns, topic_join=topic_join, match=match)
        params = (chunk,) if postgresql else tuple(chunk)
        for row in connection.exec_driver_sql(sql, params):
            if topic_id is None:
                state = State(left_all_reason=row[2], left_all_version=row[3])
            else:
                subscribed = None if row[5] is None else bool(row[5])
                state = State(False, row[2], row[3], subscribed, row[6])
            found[row[0]] = Known(row[1], state, bool(row[4]))
    session.commit()  # end the read snapshot; inserts below take the write lock
    return found


def _create(session: Session, emails: set[str], topic_id: int | None) -> dict[str, Known | None]:
    """Insert the subscribers never seen before; erased addresses stay erased."""
    key = fingerprint_key(session)
    by_fingerprint = {address_fingerprint(key, e): e for e in emails}
    erased: set[str] = set()
    query = select(ErasedAddress.fingerprint).where(_emails_match(session, ErasedAddress.fingerprint, "fps"))
    for chunk in _chunks(by_fingerprint):
        erased.update(by_fingerprint[fp] for fp in session.scalars(query, {"fps": chunk}))
    session.commit()
    created: dict[str, Known | None] = dict.fromkeys(erased)
    fresh = emails - erased
    if not fresh:
        return created
    now = utcnow()
    insert = insert_for(session)
    with write_transaction(session):
        for chunk in _chunks(fresh):
            rows = [
                {"email": e, "public_id": new_public_id(), "created_at": now, "version": 0} for e in chunk
            ]
            session.execute(
                insert(Subscriber).on_conflict_do_nothing(index_elements=[Subscriber.email]),
                rows,
                # one multi-row INSERT per chunk, not one per 1,000 rows
                execution_options={"insertmanyvalues_page_size": CHUNK},
            )
    # read back: a concurrent check may have inserted some of them first
    created.update(_known(session, set(fresh), topic_id))
    return created


def public_ids(session: Session, emails: set[str]) -> dict[str, str | None]:
    """Return the public id of each normalized address, creating the new ones (None: erased)."""
    known = _known(session, emails, None)
    new = emails.difference(known)
    if new:
        known.update(_create(session, new, None))
    return {email: (None if k is None else k.public_id) for email, k in known.items()}
