"""The send-time check: one verdict per recipient, with tokens, in a bounded number of statements.

The batch is normalized in memory, the known subscribers and their state for the topic
are read in one set-based query per chunk, the new ones are inserted in one statement
per chunk, and ``rules.verdict`` judges each recipient.  No statement is issued per
recipient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import String, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from .addresses import normalize_or_none
from .db import driver_rows, write_transaction
from .ledger import new_public_id
from .models import ErasedAddress, Subscriber, utcnow
from .privacy import address_fingerprint, fingerprint_key
from .rules import REASONS, Category, State, verdict
from .tokens import Tokens, check_campaign
from .topics import resolve

CHUNK = 5000
ERASED_STATE = State(erased=True)
STRANGER = State()


class Known(NamedTuple):
    """What one query tells about a subscriber for the topic being checked."""

    public_id: str
    state: State
    bounced: bool


class Answer(NamedTuple):
    """One address's verdict and the tokens of its links (a tuple: there are thousands)."""

    allowed: bool
    reason: str | None
    unsubscribe_token: str | None  # marketing mail to an allowed recipient only
    preferences_token: str | None
    hard_bounce: bool


INVALID = Answer(False, "invalid_address", None, None, False)
# a refusal carries no links: one shared answer per reason
_REFUSED = {reason: Answer(False, reason, None, None, False) for reason in REASONS}


def check_recipients(
    session: Session,
    tokens: Tokens,
    key: str,
    recipients: Sequence[str],
    campaign: str | None = None,
) -> list[tuple[str, Answer]]:
    """Return each recipient as given with its answer, in order, for mail of category ``key``."""
    category, topic = resolve(session, key)
    if campaign is not None:
        check_campaign(campaign)
    normalized = [normalize_or_none(r) for r in recipients]
    known = _subscribers(
        session, {n for n in normalized if n is not None}, None if topic is None else topic.id
    )

    # one minter for the whole batch: the topic and campaign are encoded once
    mint = tokens.preferencer() if topic is None else tokens.unsubscriber(topic.key, campaign)
    transactional = topic is None
    # one answer per distinct address, however often the batch repeats it
    by_address = {
        address: _answer(subscriber, category, mint, transactional) for address, subscriber in known.items()
    }
    return [
        (given, INVALID if address is None else by_address[address])
        for given, address in zip(recipients, normalized, strict=True)
    ]


def _answer(
    subscriber: Known | None, category: Category, mint: Callable[[str], str], transactional: bool
) -> Answer:
    if subscriber is None:  # erased: no links, since nothing may name the person any more
        judged = verdict(ERASED_STATE, category)
        return Answer(judged.allowed, judged.reason, None, None, False)
    judged = verdict(subscriber.state, category)
    if not judged.allowed:
        return _REFUSED[cast(str, judged.reason)]  # a refusal always names its reason
    if transactional:  # a preferences link, no unsubscribe headers
        return Answer(True, None, None, mint(subscriber.public_id), subscriber.bounced)
    # one token serves both links: the preference center accepts unsubscribe tokens
    token = mint(subscriber.public_id)
    return Answer(True, None, token, token, False)


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


_COLUMNS = "s.email, s.public_id, s.left_all_reason, s.left_all_version, s.bounced_at IS NOT NULL"
# PostgreSQL: joining the unnested array makes the planner probe the index once per
# address; "= ANY(array)" of thousands makes it scan the whole table instead
_SOURCE = {
    "postgresql": "unnest(%s::text[]) AS wanted(email) JOIN subscribers s ON s.email = wanted.email",
    "sqlite": "subscribers s",
}


def _known(session: Session, emails: set[str], topic_id: int | None) -> dict[str, Known | None]:
    """Read the state of the known subscribers among ``emails``, one query per chunk."""
    # plain driver SQL: the rows need no ORM objects and no per-value type processing
    postgresql = session.get_bind().dialect.name == "postgresql"
    columns, join = _COLUMNS, ""
    if topic_id is not None:
        columns += ", p.subscribed, p.version"
        join = f" LEFT JOIN preferences p ON p.subscriber_id = s.id AND p.topic_id = {int(topic_id)}"
    source = _SOURCE["postgresql" if postgresql else "sqlite"]
    found: dict[str, Known | None] = {}
    for chunk in _chunks(emails):
        where = "" if postgresql else f" WHERE s.email IN ({','.join('?' * len(chunk))})"
        # every piece of the text is a constant or an int; the addresses are parameters
        sql = f"SELECT {columns} FROM {source}{join}{where}"  # noqa: S608
        rows = driver_rows(session, sql, (chunk,) if postgresql else chunk)
        if topic_id is None:
            for email, public_id, left, left_version, bounced in rows:
                found[email] = Known(public_id, State(False, left, left_version), bool(bounced))
        else:
            for email, public_id, left, left_version, bounced, subscribed, version in rows:
                if subscribed is not None:
                    subscribed = bool(subscribed)  # SQLite gives 0 and 1
                state = State(False, left, left_version, subscribed, version)
                found[email] = Known(public_id, state, bool(bounced))
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
    with write_transaction(session):
        inserted = _insert(session, fresh)
    # a stranger until now: no choices, never left, never bounced
    created.update((email, Known(public_id, STRANGER, False)) for email, public_id in inserted)
    raced = fresh.difference(created)
    if raced:  # a concurrent check inserted these first: read what it made
        created.update(_known(session, raced, topic_id))
    return created


_INSERT = {
    # one statement per chunk; RETURNING tells which rows this call made
    "postgresql": (
        "INSERT INTO subscribers (email, public_id, created_at, version)"
        " SELECT e, p, %s, 0 FROM unnest(%s::text[], %s::text[]) AS new(e, p)"
        " ON CONFLICT (email) DO NOTHING RETURNING email, public_id"
    ),
    "sqlite": (
        "INSERT INTO subscribers (email, public_id, created_at, version) VALUES {rows}"
        " ON CONFLICT (email) DO NOTHING RETURNING email, public_id"
    ),
}


def _insert(session: Session, emails: set[str]) -> list[tuple[str, str]]:
    """Insert a subscriber for each address not yet on file; return those made here."""
    dialect = session.get_bind().dialect
    # the time as the column's own type stores it, so the rows read like the ORM's
    stamp = Subscriber.__table__.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
    now = utcnow() if stamp is None else stamp(utcnow())
    made: list[tuple[str, str]] = []
    for chunk in _chunks(emails):
        ids = [new_public_id() for _ in chunk]
        if dialect.name == "postgresql":
            made.extend(driver_rows(session, _INSERT["postgresql"], (now, chunk, ids)))
        else:
            sql = _INSERT["sqlite"].format(rows=",".join(["(?, ?, ?, 0)"] * len(chunk)))
            params = [value for row in zip(chunk, ids, [now] * len(chunk), strict=True) for value in row]
            made.extend(driver_rows(session, sql, params))
    return made


def _subscribers(session: Session, emails: set[str], topic_id: int | None) -> dict[str, Known | None]:
    """Return every address's subscriber state, creating the new ones (None: erased)."""
    known = _known(session, emails, topic_id)
    new = emails.difference(known)
    if new:
        known.update(_create(session, new, topic_id))
    return known


def public_ids(session: Session, emails: set[str]) -> dict[str, str | None]:
    """Return the public id of each normalized address, creating the new ones (None: erased)."""
    return {
        email: (None if k is None else k.public_id)
        for email, k in _subscribers(session, emails, None).items()
    }
