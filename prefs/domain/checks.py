"""The send-time check: one verdict per recipient, with tokens, in a bounded number of statements.

The batch is normalized in memory, the known subscribers and their state for the topic
are read in one set-based query per chunk, the new ones are inserted in one statement
per chunk, and ``rules.verdict`` judges each recipient.  No statement is issued per
recipient.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, cast

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from ..models import Subscriber, utcnow
from ..store import driver_rows, driver_rows_meanwhile, run_committed, tallies
from .addresses import normalize_all
from .ledger import new_public_ids
from .privacy import address_fingerprint, fingerprint_key
from .rules import REASONS, Category, State, verdict
from .tokens import Tokens, check_campaign
from .topics import resolve

CHUNK = 5000
ERASED_STATE = State(erased=True)


# What one query tells of a known subscriber for the topic being checked, as the driver
# gives it: (email, public_id, bounced, left_all_reason, left_all_version[, subscribed,
# version, source]). A plain row, no object per subscriber: a check reads thousands. From
# the third field on is the recorded state, which many subscribers share.
Known = tuple[Any, ...]
_PUBLIC_ID, _BOUNCED, _STATE = 1, 2, 2


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
    # one minter for the whole batch: the topic and campaign are encoded once
    mint = tokens.preferences_minter() if topic is None else tokens.unsubscribe_minter(topic.key, campaign)
    topic_id = None if topic is None else topic.id  # read now: a commit below expires the topic
    normalized = normalize_all(recipients)
    emails = {n for n in normalized if n is not None}

    known = _known(session, emails, topic_id)
    by_address: dict[str, Answer] = {}

    def judge_known() -> None:
        by_address.update(_answers(known, category, mint, transactional=topic is None))

    new = emails.difference(known)
    if new:  # the known are judged while the database inserts the new
        created = _create(session, new, topic_id, meanwhile=judge_known)
        by_address.update(_answers(created, category, mint, transactional=topic is None))
    else:
        judge_known()
    return [
        (given, INVALID if address is None else by_address[address])
        for given, address in zip(recipients, normalized, strict=True)
    ]


def _answers(
    known: dict[str, Known | None], category: Category, mint: Callable[[str], str], transactional: bool
) -> dict[str, Answer]:
    """Answer each distinct address: ``verdict`` once per distinct recorded state, a token per allowed one."""
    refusals: dict[tuple[Any, ...], Answer | None] = {}  # a state's refusal, or None: allowed
    answers: dict[str, Answer] = {}
    for address, row in known.items():
        if row is None:  # erased: no links, since nothing may name the person any more
            judged = verdict(ERASED_STATE, category)
            answers[address] = Answer(judged.allowed, judged.reason, None, None, False)
            continue
        recorded = row[_STATE:]
        refusal = refusals.get(recorded, _UNJUDGED)
        if refusal is _UNJUDGED:
            judged = verdict(_state(recorded), category)
            # a refusal always names its reason, and carries no links
            refusal = refusals[recorded] = None if judged.allowed else _REFUSED[cast(str, judged.reason)]
        if refusal is not None:
            answers[address] = refusal
        elif transactional:  # a preferences link, no unsubscribe headers
            answers[address] = Answer(True, None, None, mint(row[_PUBLIC_ID]), bool(row[_BOUNCED]))
        else:  # one token serves both links: the preference center accepts unsubscribe tokens
            token = mint(row[_PUBLIC_ID])
            answers[address] = Answer(True, None, token, token, False)
    return answers


_UNJUDGED = Answer(False, None, None, None, False)


def _state(recorded: tuple[Any, ...]) -> State:
    """Return the ``State`` of a row's recorded fields."""
    if len(recorded) == 3:  # no topic: whether and why the address left all marketing
        bounced, left, left_version = recorded
        return State(False, left, left_version, bounced=bool(bounced))
    bounced, left, left_version, subscribed, version, source = recorded
    if subscribed is not None:
        subscribed = bool(subscribed)  # SQLite gives 0 and 1
    return State(False, left, left_version, subscribed, version, source, bool(bounced))


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    # sorted: neighbouring keys share index pages, and concurrent inserts lock in one order
    ordered = sorted(values)
    for start in range(0, len(ordered), CHUNK):
        yield ordered[start : start + CHUNK]


_COLUMNS = "s.email, s.public_id, s.bounced_at IS NOT NULL, s.left_all_reason, s.left_all_version"
# One statement text however many addresses a chunk holds, the list passed as one JSON
# value that the database unpacks in C. SQLite keeps each distinct text prepared (about
# 1 MB for thousands of placeholders, 128 of them a connection), so "IN (?, ?, ...)" of
# every size in turn grew each worker without end. PostgreSQL: psycopg builds a text[]
# parameter element by element in Python (a quarter of the lookup's time for 5,000
# addresses); json.dumps is C. Joining the unpacked list makes the planner probe the index
# once per address; "= ANY(array)" of thousands makes it scan the whole table instead.
_WANTED = {
    "postgresql": (
        "json_array_elements_text(%s::json) AS wanted(email) JOIN subscribers s ON s.email = wanted.email",
        "",
    ),
    "sqlite": ("subscribers s", " WHERE s.email IN (SELECT value FROM json_each(?))"),
}


def _list(values: list[str]) -> str:
    """Return a list of values as the one parameter the statements above take."""
    return json.dumps(values)


def _known(session: Session, emails: set[str], topic_id: int | None) -> dict[str, Known | None]:
    """Read the state of the known subscribers among ``emails``, one query per chunk."""
    # plain driver SQL: the rows need no ORM objects and no per-value type processing
    dialect = session.get_bind().dialect.name
    columns, join = _COLUMNS, ""
    if topic_id is not None:
        columns += ", p.subscribed, p.version, p.source"
        join = f" LEFT JOIN preferences p ON p.subscriber_id = s.id AND p.topic_id = {int(topic_id)}"
    source, where = _WANTED[dialect]
    # every piece of the text is a constant or an int; the addresses are one parameter
    sql = f"SELECT {columns} FROM {source}{join}{where}"  # noqa: S608
    chunks = list(_chunks(emails))
    aside = _ASIDE.submit(session, sql, chunks[1::2]) if len(chunks) > 1 else None
    if aside is not None:
        chunks = chunks[0::2]
    rows = _read(session, sql, chunks)
    session.commit()  # end the read snapshot; inserts below take the write lock
    if aside is not None:
        rows.extend(aside.result())
    return {row[0]: row for row in rows}


def _read(session: Session, sql: str, chunks: list[list[str]]) -> list[Any]:
    """Run the lookup for each chunk in turn and return all their rows."""
    return [row for chunk in chunks for row in driver_rows(session, sql, (_list(chunk),))]


class _Aside:
    """One helper thread per process that reads chunks on a PostgreSQL connection of its own.

    psycopg lets go of the GIL while the server works, so while the request's connection
    reads one half of a large check, the helper's reads the other, in a second server
    process: the lookups overlap. Each address is read once, in one transaction or the other, so
    each answer is as consistent as a single read. The helper is used only while it is
    idle and the pool holds fewer connections than its size, so a busy host reads inline,
    as before, and nothing waits on the pool for it. Not on SQLite: its work runs in this
    process, and the two threads building rows contend for the GIL.
    """

    def __init__(self) -> None:
        self._idle = threading.Semaphore(1)
        self._pid = 0
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, session: Session, sql: str, chunks: list[list[str]]) -> Future[list[Any]] | None:
        engine = session.get_bind().engine
        if not _spare_connection(engine) or not self._idle.acquire(blocking=False):
            return None
        if self._pool is None or self._pid != os.getpid():  # a forked worker makes its own
            self._pool, self._pid = ThreadPoolExecutor(1, thread_name_prefix="prefs-lookup"), os.getpid()
        try:
            return self._pool.submit(self._read, engine, sql, chunks)
        except RuntimeError:  # the interpreter is shutting down
            self._idle.release()
            return None

    def _read(self, engine: Engine, sql: str, chunks: list[list[str]]) -> list[Any]:
        try:
            with Session(engine) as session:
                return _read(session, sql, chunks)
        finally:
            self._idle.release()


def _spare_connection(engine: Engine) -> bool:
    if engine.dialect.name != "postgresql":
        return False
    pool = engine.pool
    # below the pool's size a checkout never waits (PostgreSQL's pool has no overflow)
    return isinstance(pool, QueuePool) and pool.checkedout() < pool.size()


_ASIDE = _Aside()


def _nothing() -> None:
    pass


def _create(
    session: Session, emails: set[str], topic_id: int | None, meanwhile: Callable[[], None] = _nothing
) -> dict[str, Known | None]:
    """Insert the subscribers never seen before; erased addresses stay erased.

    ``meanwhile`` is called once: on PostgreSQL while the server inserts them.
    """
    key = fingerprint_key(session)
    by_fingerprint = {address_fingerprint(key, e): e for e in emails}
    erased: set[str] = set()
    dialect = session.get_bind().dialect.name
    for chunk in _chunks(by_fingerprint):
        rows = driver_rows(session, _ERASED[dialect], (_list(chunk),))
        erased.update(by_fingerprint[fingerprint] for (fingerprint,) in rows)
    session.commit()
    created: dict[str, Known | None] = dict.fromkeys(erased)
    fresh = emails - erased
    if not fresh:
        meanwhile()
        return created
    # PostgreSQL inserts in its own process while ``meanwhile`` runs in this one. SQLite
    # inserts in this process, and holds its write lock until the commit: after it, then.
    overlap = session.get_bind().dialect.name == "postgresql"
    judged: list[bool] = []

    def meanwhile_once() -> None:  # a try run again after a deadlock has judged them already
        if not judged:
            judged.append(True)
            meanwhile()

    def insert() -> list[tuple[str, str]]:
        tallies.bulk(session)  # hundreds of new subscribers a statement: counted at once
        return _insert(session, fresh, meanwhile_once if overlap else _nothing)

    inserted = run_committed(session, insert, events=False)
    if not overlap:
        meanwhile()
    # a stranger until now: no choices, never left, never bounced
    stranger = (False, None, None) if topic_id is None else (False, None, None, None, None, None)
    created.update((email, (email, public_id, *stranger)) for email, public_id in inserted)
    raced = fresh.difference(created)
    if raced:  # a concurrent check inserted these first: read what it made
        created.update(_known(session, raced, topic_id))
    return created


_ERASED = {
    "postgresql": (
        "SELECT e.fingerprint FROM json_array_elements_text(%s::json) AS wanted(fingerprint)"
        " JOIN erased_addresses e ON e.fingerprint = wanted.fingerprint"
    ),
    "sqlite": (
        "SELECT fingerprint FROM erased_addresses WHERE fingerprint IN (SELECT value FROM json_each(?))"
    ),
}
_INSERT = {
    # one statement per chunk, the (email, public id) pairs as one JSON array; RETURNING
    # tells which rows this call made
    "postgresql": (
        "INSERT INTO subscribers (email, public_id, created_at, version)"
        " SELECT pair->>0, pair->>1, %s, 0 FROM json_array_elements(%s::json) AS new(pair)"
        " ON CONFLICT (email) DO NOTHING RETURNING email, public_id"
    ),
    # "WHERE true" tells SQLite's parser ON CONFLICT is the upsert's
    "sqlite": (
        "INSERT INTO subscribers (email, public_id, created_at, version)"
        " SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?, 0 FROM json_each(?)"
        " WHERE true ON CONFLICT (email) DO NOTHING RETURNING email, public_id"
    ),
}


def _insert(session: Session, emails: set[str], meanwhile: Callable[[], None]) -> list[tuple[str, str]]:
    """Insert a subscriber for each address not yet on file; return those made here.

    ``meanwhile`` runs while the database inserts them (``driver_rows_meanwhile``).
    """
    dialect = session.get_bind().dialect
    # the time as the column's own type stores it, so the rows read like the ORM's
    stamp = Subscriber.__table__.c.created_at.type.dialect_impl(dialect).bind_processor(dialect)
    now = utcnow() if stamp is None else stamp(utcnow())
    params = [
        (now, json.dumps(list(zip(chunk, new_public_ids(len(chunk)), strict=True))))
        for chunk in _chunks(emails)
    ]
    made = driver_rows_meanwhile(session, _INSERT[dialect.name], params, meanwhile)
    return cast(list[tuple[str, str]], made)


def _subscribers(session: Session, emails: set[str], topic_id: int | None) -> dict[str, Known | None]:
    """Return every address's subscriber state, creating the new ones (None: erased)."""
    known = _known(session, emails, topic_id)
    new = emails.difference(known)
    if new:
        known.update(_create(session, new, topic_id))
    return known


def ensure_public_ids(session: Session, emails: set[str]) -> dict[str, str | None]:
    """Return the public id of each normalized address, creating the new ones (None: erased)."""
    return {
        email: (None if k is None else k[_PUBLIC_ID])
        for email, k in _subscribers(session, emails, None).items()
    }
