"""Record opt-outs and re-subscriptions with their audit events, and read state for verdicts.

Each recording function runs in one write transaction that is committed before it
returns: an acknowledged opt-out is never lost.  A request that changes nothing
records nothing, so every audit event is a real change.

The lock order. On PostgreSQL every writer takes its locks in this one order, so no
two of them can deadlock (SQLite's writers take turns on one lock):

1. a request's idempotency key (``idempotency.once``: a second request with the key waits);
2. new subscribers, by inserting them in address order (``checks``, ``imports``: a
   concurrent insert of the same address waits on the unique index);
3. subscriber rows, in public id order (``sorted`` on ``str``, ``COLLATE "C"`` in SQL);
   the group commit, ``record_many``, imports and erasure all lock them so;
4. a subscriber's preferences and events, only while holding that subscriber's row.

One transaction locks its subscribers in one pass of that order: a writer that would
lock a second set after the first commits in between. A deadlock that a foreign
transaction causes anyway is tried again (``db.run_committed``) before it is a 503.
"""

from __future__ import annotations

import base64
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ..errors import DomainError, InvalidValue, UnknownSubscriber, UnknownTopic
from ..models import ErasedAddress, Event, Preference, Subscriber, Topic, utcnow
from ..ops import metrics
from ..store import GroupCommit, Writer, bound_lock_waits, queries, run_committed, write_transaction
from .changes import (
    BOUNCE_LIFTED,
    CHANGED,
    RESUBSCRIBE,
    UNCHANGED,
    UNSUBSCRIBE,
    Change,
    Origin,
    Recorded,
)
from .privacy import address_fingerprint, fingerprint_key
from .rules import (
    LEFT_ALL_REASONS,
    LIFTED_BY,
    RANK,
    STRANGER,
    Category,
    State,
    Verdict,
    held_by,
    rank,
    rejoin,
    verdict,
)
from .topics import KEY, resolve


def new_public_id() -> str:
    """Return a random public id of 96 bits, never derived from the row id or the address."""
    return new_public_ids(1)[0]


def new_public_ids(count: int) -> list[str]:
    """Return ``count`` public ids for one batch of new subscribers, from one read of urandom.

    Each is 16 URL-safe characters of 96 random bits: the first 24 bits drawn once for the
    batch, the other 72 for each id. Sharing the first four
    characters puts a batch's ids side by side in the public id index, so inserting a
    check's hundreds of new recipients, or an import's thousands, writes a few of its pages
    instead of one page per id. Nothing about the batch is in the prefix, neither a time nor an order,
    and 72 bits are still far beyond guessing; a link is honoured for its signature anyway.
    """
    # 3 + 9n bytes are 4 + 12n base64 characters: no padding, and no character spans two parts
    text = base64.urlsafe_b64encode(os.urandom(3 + 9 * count)).decode()
    return [text[:4] + text[i : i + 12] for i in range(4, 4 + 12 * count, 12)]


def insert_for(session: Session) -> Any:
    """Return the dialect's ``insert`` construct, which knows ``ON CONFLICT``."""
    name = session.get_bind().dialect.name
    return postgresql.insert if name == "postgresql" else sqlite.insert


# the writing transaction's id on PostgreSQL; SQLite's writers are serialized and write 0


def txid_for(session: Session) -> Any:
    """Return the value of ``events.txid`` for rows written in this transaction."""
    if session.get_bind().dialect.name == "postgresql":
        return literal_column(queries.PG_TXID)
    return 0


def find_subscriber(session: Session, email: str) -> Subscriber | None:
    """Return the subscriber with this normalized address, if any."""
    return session.scalar(select(Subscriber).where(Subscriber.email == email))


def subscriber_by_public_id(session: Session, public_id: str) -> Subscriber:
    """Return the subscriber a link names, or raise ``UnknownSubscriber``."""
    subscriber = session.scalar(select(Subscriber).where(Subscriber.public_id == public_id))
    if subscriber is None:
        raise UnknownSubscriber("nobody is on file for this link")
    return subscriber


def is_erased(session: Session, email: str) -> bool:
    """Tell whether this normalized address was erased."""
    fingerprint = address_fingerprint(fingerprint_key(session), email)
    return session.get(ErasedAddress, fingerprint) is not None


def ensure_subscriber(session: Session, email: str) -> Subscriber:
    """Return the subscriber for a normalized address, creating it once if it is new."""
    subscriber = find_subscriber(session, email)
    if subscriber is not None:
        return subscriber
    if is_erased(session, email):
        raise UnknownSubscriber("this address was erased and is kept out of all marketing")
    insert = insert_for(session)
    with write_transaction(session):
        session.execute(
            insert(Subscriber)
            .values(email=email, public_id=new_public_id(), created_at=utcnow(), version=0)
            .on_conflict_do_nothing(index_elements=[Subscriber.email])
        )
    subscriber = find_subscriber(session, email)
    assert subscriber is not None
    return subscriber


def state_of(session: Session, subscriber: Subscriber | None, category: Category) -> State:
    """Read what is recorded for one subscriber and category."""
    if subscriber is None or category.transactional:
        return STRANGER
    row = session.execute(
        select(Preference.subscribed, Preference.version, Preference.source)
        .join(Topic, Topic.id == Preference.topic_id)
        .where(Preference.subscriber_id == subscriber.id, Topic.key == category.key)
    ).first()
    return State(
        left_all_reason=subscriber.left_all_reason,
        left_all_version=subscriber.left_all_version,
        subscribed=row.subscribed if row else None,
        version=row.version if row else None,
        source=row.source if row else None,
        bounced=subscriber.bounced_at is not None,
    )


def verdict_for(session: Session, email: str, key: str) -> Verdict:
    """Decide whether the category ``key`` may be sent to a normalized address."""
    category, _ = resolve(session, key)
    subscriber = find_subscriber(session, email)
    if subscriber is None and not category.transactional and is_erased(session, email):
        return verdict(State(erased=True), category)
    return verdict(state_of(session, subscriber, category), category)


def record_opt_out(
    session: Session | Engine,
    public_id: str,
    topic_key: str | None,
    origin: Origin,
    reason: str = "unsubscribed",
) -> bool:
    """Take a subscriber out of one topic, or of all marketing; return whether anything changed.

    Committed before it returns, in a group with the changes of concurrent requests. A
    caller with no session of its own (the one-click layer) passes the engine.
    """
    return _run(session, Change(public_id, topic_key, False, origin, reason)).changed


def record_resubscribe(session: Session, public_id: str, topic_key: str | None, origin: Origin) -> Recorded:
    """Bring a subscriber back to one topic, or to all marketing, as far as ``origin`` may."""
    return _run(session, Change(public_id, topic_key, True, origin))


def _run(session: Session | Engine, change: Change) -> Recorded:
    if isinstance(session, Engine):
        return _group(session).run(change)
    return _group(session.get_bind().engine).run(change, session)


def record_choices(
    session: Session, public_id: str, choices: Mapping[str, bool], origin: Origin
) -> list[str]:
    """Save a preference center's form in one transaction; return the topics that changed."""

    def save() -> list[str]:
        bound_lock_waits(session)
        return [key for key, on in choices.items() if choose(session, public_id, key, on, origin).changed]

    return run_committed(session, save)


def record_many(session: Session, changes: list[Change]) -> list[Recorded]:
    """Record a batch of changes in one transaction; return, for each, what was recorded.

    They are applied in the lock order (by public id); one subscriber's in the order given.
    """
    order = sorted(range(len(changes)), key=lambda i: changes[i].public_id)

    def record() -> list[Recorded]:
        recorded: dict[int, Recorded] = {}
        for i in order:
            recorded[i] = _apply(session, changes[i])
        return [recorded[i] for i in range(len(changes))]

    return run_committed(session, record)


def _apply(session: Writer, change: Change) -> Recorded:
    """Record one change in the open write transaction; a domain error comes before any write."""
    if change.topic_key is not None:
        return choose(session, change.public_id, change.topic_key, change.subscribe, change.origin)
    if change.subscribe:
        return _rejoin_all(session, change.public_id, change.origin)
    left = leave_all(session, change.public_id, change.reason, change.origin)
    return UNCHANGED if left is None else CHANGED


# one group commit per database: requests of this process share it
_groups: weakref.WeakKeyDictionary[Engine, GroupCommit[Change, Recorded]] = weakref.WeakKeyDictionary()
_groups_lock = threading.Lock()


def _group(engine: Engine) -> GroupCommit[Change, Recorded]:
    group = _groups.get(engine)
    if group is None:
        with _groups_lock:
            group = _groups.setdefault(
                engine,
                GroupCommit(
                    _apply,
                    DomainError,
                    order=lambda change: change.public_id,
                    engine=engine,
                    on_commit=metrics.committed,
                ),
            )
    return group


# a stronger reason replaces a weaker one, never the reverse (rules.RANK)
_LEAVE_ALL = queries.leave_all(RANK)


def lock_subscriber(session: Writer, public_id: str) -> Any:
    """Bump a subscriber's version, which locks its row until the transaction ends; return its state.

    The row: id, version, left_all_version, left_all_reason, and whether a hard bounce is on
    file. Concurrent changes to one subscriber take turns.
    """
    row = queries.BUMP.first(session, {"public_id": public_id})
    if row is None:
        raise UnknownSubscriber("nobody is on file for this link")
    return (*row[:4], row[4] is not None)


# a topic's key and id never change and topics are never deleted: once read, always right
_topic_ids: weakref.WeakKeyDictionary[Engine, dict[str, tuple[int, bool]]] = weakref.WeakKeyDictionary()


def topic_of(session: Writer, key: str) -> tuple[int, bool]:
    """Return a topic's id and whether it is opt-in; neither ever changes."""
    known = _topic_ids.setdefault(session.get_bind().engine, {})
    topic = known.get(key)
    if topic is None:
        found = queries.TOPIC_ID.first(session, {"key": key}) if KEY.match(key) else None
        if found is None:
            raise UnknownTopic(f"there is no topic {key!r}")
        topic = known[key] = (int(found[0]), bool(found[1]))
    return topic


def choose(session: Writer, public_id: str, topic_key: str, subscribed: bool, origin: Origin) -> Recorded:
    """Record one explicit choice for a topic, in the open write transaction."""
    topic_id, opt_in = topic_of(session, topic_key)
    subscriber_id, version, left_all_version, left_all_reason, bounced = lock_subscriber(session, public_id)
    lifted = None
    if subscribed and left_all_reason is not None:
        # a complaint or a hard bounce comes back only from those who may lift it (the rule)
        kept_out = held_by(left_all_reason, bool(bounced), origin.source)
        if kept_out is not None:
            return Recorded(False, kept_out)
        lifted = left_all_reason if left_all_reason in LIFTED_BY else None
    # someone who never left all marketing receives an opt-out topic by default: choosing
    # it is a change only where a refusal is on file (a repeat records nothing)
    statement = (
        queries.BACK_TO_DEFAULT if subscribed and not opt_in and left_all_version is None else queries.CHOOSE
    )
    changed = statement.first(
        session,
        {
            "subscriber_id": subscriber_id,
            "topic_id": topic_id,
            "subscribed": subscribed,
            "version": version,
            "source": origin.source,
            "now": origin.at or utcnow(),
            "left_all_version": left_all_version,
        },
    )
    if changed is None:
        return UNCHANGED
    action = RESUBSCRIBE if subscribed else UNSUBSCRIBE
    # the proof of a lift: the reason it lifted, with the source, campaign and time
    return Recorded(
        True, None, record_event(session, subscriber_id, topic_id, topic_key, action, lifted, origin)
    )


def leave_all(session: Writer, public_id: str, reason: str, origin: Origin) -> int | None:
    """Take a subscriber out of all marketing; return the event's id, or None if nothing changed."""
    if reason not in LEFT_ALL_REASONS:
        raise InvalidValue(f"unknown reason {reason!r}")
    now = origin.at or utcnow()
    params = {
        "public_id": public_id,
        "reason": reason,
        "now": now,
        "bounced": reason == "bounced",
        "rank": rank(reason),
    }
    row = _LEAVE_ALL.first(session, params)
    if row is None:
        lock_subscriber(session, public_id)  # raises for an unknown subscriber
        if reason == "bounced":
            queries.BOUNCED.first(session, {"now": now, "public_id": public_id})
        return None
    return record_event(session, row[0], None, None, UNSUBSCRIBE, reason, origin)


def _rejoin_all(session: Writer, public_id: str, origin: Origin) -> Recorded:
    subscriber_id, _, _, left_all_reason, bounced = lock_subscriber(session, public_id)
    lift = rejoin(left_all_reason, bool(bounced), origin.source)
    params = {"subscriber_id": subscriber_id, "bounce": lift.bounce}
    lifted = left_all_reason if left_all_reason in LIFTED_BY else None
    if lift.left:
        queries.REJOIN_ALL.first(session, params)
        record_event(session, subscriber_id, None, None, RESUBSCRIBE, lifted, origin)
    elif lift.bounce:
        queries.LIFT_BOUNCE.first(session, params)
        record_event(session, subscriber_id, None, None, BOUNCE_LIFTED, "bounced", origin)
    return Recorded(lift.left or lift.bounce, lift.kept_out)


def record_event(
    session: Writer,
    subscriber_id: int,
    topic_id: int | None,
    topic_key: str | None,
    action: str,
    reason: str | None,
    origin: Origin,
) -> int:
    """Append one audit event in the open write transaction; return its id."""
    statement = queries.EVENTS["postgresql" if session.get_bind().dialect.name == "postgresql" else "sqlite"]
    row = statement.first(
        session,
        {
            "subscriber_id": subscriber_id,
            "topic_id": topic_id,
            "action": action,
            "reason": reason,
            "source": origin.source,
            "campaign": origin.campaign,
            "fingerprint": origin.fingerprint,
            "at": origin.at or utcnow(),
        },
    )
    metrics.count_change(session, topic_key, action, reason, origin.source, origin.campaign)
    assert row is not None
    return int(row[0])


def history(session: Session, subscriber: Subscriber) -> list[tuple[Event, str | None]]:
    """Return every audit event of a subscriber, oldest first, with its topic key."""
    rows = session.execute(
        select(Event, Topic.key)
        .outerjoin(Topic, Topic.id == Event.topic_id)
        .where(Event.subscriber_id == subscriber.id)
        .order_by(Event.id)
    )
    return [(event, key) for event, key in rows]
