"""Import a suppression list from another service: streamed, in batches of set-based statements.

Each batch is staged in a temporary table, then one statement each: drop the erased
addresses, insert the new subscribers, take the batch out of all marketing (or out of
one topic), and append the audit events.  Nobody is ever resubscribed, an erased
address is never brought back, and a second run of the same file changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from itertools import islice
from typing import Any, TextIO

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateTable

from ..models import ErasedAddress, Event, Preference, Subscriber, UTCDateTime, utcnow
from ..ops import metrics
from ..store import run_committed, tallies
from .addresses import normalize_or_none
from .changes import UNSUBSCRIBE
from .import_formats import Row, read_rows
from .ledger import insert_for, new_public_ids, txid_for
from .privacy import address_fingerprinter, fingerprint_key
from .rules import rank
from .topics import get_topic

BATCH = 5000
BATCHES_PER_COMMIT = 5
SQLITE_CACHE_KIB = 64 * 1024
SOURCE = "import"
# the summary keeps this many invalid line numbers; the count is always complete
MAX_LINES_SHOWN = 100
# a batch's addresses, each with its strongest reason, first time and campaign
Batch = dict[str, tuple[str, datetime, str | None]]

staging = Table(
    "prefs_import_batch",
    MetaData(),
    Column("email", String(320), primary_key=True),
    Column("fingerprint", String(64)),
    Column("public_id", String(22)),
    Column("reason", String(16)),
    Column("at", UTCDateTime),
    Column("campaign", String(64)),
    Column("changed", Boolean, default=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DELETE ROWS",
)


@dataclass
class Summary:
    """What an import did (or, with ``dry_run``, would do)."""

    format: str
    dry_run: bool = False
    read: int = 0
    added: int = 0
    already: int = 0
    erased: int = 0
    invalid: int = 0
    invalid_lines: list[int] = field(default_factory=list)


class _DryRun(Exception):
    """Roll the transaction back: a dry run counts and changes nothing."""

    def __init__(self, done: list[tuple[int, int, int]]) -> None:
        super().__init__()
        self.done = done


def import_file(
    session: Session,
    stream: TextIO,
    fmt: str = "auto",
    topic_key: str | None = None,
    dry_run: bool = False,
    batch_size: int = BATCH,
    now: datetime | None = None,
) -> Summary:
    """Import a suppression list; out of all marketing, or of one topic with ``topic_key``."""
    topic_id = get_topic(session, topic_key).id if topic_key is not None else None
    fmt, rows = read_rows(stream, fmt)
    summary = Summary(fmt, dry_run)
    fingerprint = address_fingerprinter(fingerprint_key(session))
    dialect = session.get_bind().dialect
    # the dialect's own processor: SQLite keeps times as text in SQLAlchemy's one format
    at_type = staging.c.at.type.dialect_impl(dialect)
    to_db: Callable[[Any], Any] = at_type.bind_processor(dialect) or (lambda value: value)
    # a few batches per transaction on SQLite: each commit is an fsync (synchronous=FULL).
    # One on PostgreSQL: a transaction locks its subscribers in one pass of the lock order
    per_commit = 1 if dialect.name == "postgresql" else BATCHES_PER_COMMIT
    chunks = _chunks(rows, batch_size)
    while taken := list(islice(chunks, per_commit)):
        batches = [_valid(chunk, summary, now or utcnow()) for chunk in taken]
        record = partial(_record, session, batches, fingerprint, to_db, topic_id, topic_key, now, dry_run)
        try:
            done = run_committed(session, record)
        except _DryRun as rolled_back:
            done = rolled_back.done
        for added, erased, staged_count in done:
            summary.added += added
            summary.erased += erased
            summary.already += staged_count - added - erased
    return summary


def _record(
    session: Session,
    batches: list[Batch],
    fingerprint: Callable[[str], str],
    to_db: Callable[[Any], Any],
    topic_id: int | None,
    topic_key: str | None,
    now: datetime | None,
    dry_run: bool,
) -> list[tuple[int, int, int]]:
    """Within a write transaction: record the batches; return, for each, added, erased and staged."""
    # most databases have erased nobody: then no row needs its fingerprint
    erasures = session.scalar(select(ErasedAddress.fingerprint).limit(1)) is not None
    done = []
    for batch in batches:
        if not batch:
            continue
        staged = [
            (email, fingerprint(email) if erasures else None, public_id, reason, to_db(at), campaign)
            for (email, (reason, at, campaign)), public_id in zip(
                sorted(batch.items()), new_public_ids(len(batch)), strict=True
            )
        ]
        done.append((*_apply(session, staged, topic_id, topic_key, now or utcnow()), len(staged)))
    if dry_run:
        raise _DryRun(done)
    return done


def _chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _valid(chunk: Iterable[Row], summary: Summary, now: datetime) -> Batch:
    """Normalize a chunk; keep one entry per address, with its strongest reason and first time."""
    batch: Batch = {}
    for row in chunk:
        summary.read += 1
        email = normalize_or_none(row.email)
        if email is None:
            summary.invalid += 1
            if len(summary.invalid_lines) < MAX_LINES_SHOWN:
                summary.invalid_lines.append(row.line)
            continue
        at = min(row.at, now) if row.at is not None else now
        seen = batch.get(email)
        if seen is None:
            batch[email] = (row.reason, at, row.campaign)
        elif rank(row.reason) > rank(seen[0]) or at < seen[1]:
            reason = row.reason if rank(row.reason) > rank(seen[0]) else seen[0]
            batch[email] = (reason, min(at, seen[1]), seen[2] or row.campaign)
    return batch


def _apply(
    session: Session,
    staged: list[tuple[Any, ...]],
    topic_id: int | None,
    topic_key: str | None,
    now: datetime,
) -> tuple[int, int]:
    """Within a write transaction: record one batch; return how many were added and erased."""
    if session.get_bind().dialect.name == "sqlite":
        # a million random keys into the address index thrash SQLite's 2 MB default page cache
        session.execute(text(f"PRAGMA cache_size={-SQLITE_CACHE_KIB}"))
    tallies.bulk(session)  # thousands of rows a statement: counted a statement at a time
    session.execute(CreateTable(staging, if_not_exists=True))
    session.execute(delete(staging))
    _stage(session, staged)
    erased = _rowcount(
        session.execute(delete(staging).where(staging.c.fingerprint.in_(select(ErasedAddress.fingerprint))))
    )
    postgresql = session.get_bind().dialect.name == "postgresql"
    made = 0
    if topic_id is None and postgresql:
        # the new subscribers are written once, already out of all marketing, and marked
        # changed in the same statement: an insert then an update wrote every row twice
        # (a new row version and an entry in each index), half the batch's time here
        inserted = (
            insert_for(session)(Subscriber)
            .from_select(
                ["email", "public_id", "created_at", "version",
                 "left_all_reason", "left_all_version", "left_all_at"],
                select(staging.c.email, staging.c.public_id, literal(now, UTCDateTime), literal(1),
                       staging.c.reason, literal(1), staging.c.at)
                .order_by(staging.c.email),  # the lock order: new addresses in address order
            )
            .on_conflict_do_nothing(index_elements=[Subscriber.email])
            .returning(Subscriber.email)
            .cte("made")
        )  # fmt: skip
        made = _rowcount(
            session.execute(update(staging).where(staging.c.email == inserted.c.email).values(changed=True))
        )
    else:
        new = select(staging.c.email, staging.c.public_id, literal(now, UTCDateTime), literal(0))
        session.execute(
            insert_for(session)(Subscriber)
            .from_select(
                ["email", "public_id", "created_at", "version"],
                # the lock order: new addresses in address order (SQLite's writers take turns)
                new.order_by(staging.c.email) if postgresql else new.where(true()),
            )
            .on_conflict_do_nothing(index_elements=[Subscriber.email])
        )
    # the rows this batch just made are its own already
    in_batch = Subscriber.email.in_(select(staging.c.email).where(staging.c.changed.is_(False)))
    if postgresql:
        # lock the batch's other subscribers, so the rows chosen below are the rows changed
        # (SQLite's BEGIN IMMEDIATE holds the whole database already)
        # in the lock order: by public id, compared byte by byte as Python's sorted() does
        session.execute(
            select(Subscriber.id)
            .where(in_batch)
            .order_by(Subscriber.public_id.collate("C"))
            .with_for_update()
        ).all()
    added = made + (_leave_all(session) if topic_id is None else _leave_topic(session, topic_id))
    txid = session.scalar(select(txid_for(session)))
    session.execute(
        insert(Event).from_select(
            ["txid", "subscriber_id", "topic_id", "action", "reason", "source", "campaign", "created_at"],
            select(
                literal(txid),
                Subscriber.id,
                literal(topic_id, Integer),
                literal(UNSUBSCRIBE),
                staging.c.reason,
                literal(SOURCE),
                staging.c.campaign,
                staging.c.at,
            )
            .join(Subscriber, Subscriber.email == staging.c.email)
            .where(staging.c.changed.is_(True)),
        )
    )
    for reason, count in session.execute(
        select(staging.c.reason, func.count()).where(staging.c.changed.is_(True)).group_by(staging.c.reason)
    ):
        metrics.count_change(session, topic_key, UNSUBSCRIBE, reason, SOURCE, count=count)
    # the staged addresses must not outlive the batch, even in a temporary table
    session.execute(delete(staging))
    return added, erased


def _stage(session: Session, staged: list[tuple[Any, ...]]) -> None:
    # the bulk of the rows: straight to the driver, values already in database form
    connection = session.connection().connection.dbapi_connection
    assert connection is not None
    columns = "email, fingerprint, public_id, reason, at, campaign, changed"
    cursor = connection.cursor()
    try:
        if session.get_bind().dialect.name == "postgresql":
            # COPY: a tenth of executemany's round trips and parsing
            with cursor.copy(f"COPY {staging.name} ({columns}) FROM STDIN") as copy:
                for row in staged:
                    copy.write_row((*row, False))
        else:
            cursor.executemany(
                f"INSERT INTO {staging.name} ({columns}) VALUES (?, ?, ?, ?, ?, ?, 0)",  # noqa: S608
                staged,
            )
    finally:
        cursor.close()


def _leave_all(session: Session) -> int:
    # anyone already out of all marketing stays as recorded, whatever the file says
    session.execute(
        update(staging)
        .where(exists().where(Subscriber.email == staging.c.email, Subscriber.left_all_reason.is_(None)))
        .values(changed=True)
    )
    # UPDATE ... FROM the batch: one join, not two correlated lookups a row
    return _rowcount(
        session.execute(
            update(Subscriber)
            .where(
                Subscriber.email == staging.c.email,
                staging.c.changed.is_(True),
                Subscriber.left_all_reason.is_(None),
            )
            .values(
                version=Subscriber.version + 1,
                left_all_version=Subscriber.version + 1,
                left_all_reason=staging.c.reason,
                left_all_at=staging.c.at,
            )
            .execution_options(synchronize_session=False)
        )
    )


def _leave_topic(session: Session, topic_id: int) -> int:
    opted_out = (
        select(Preference.subscriber_id)
        .join(Subscriber, Subscriber.id == Preference.subscriber_id)
        .where(
            Subscriber.email == staging.c.email,
            Preference.topic_id == topic_id,
            Preference.subscribed.is_(False),
        )
    )
    session.execute(update(staging).where(~exists(opted_out)).values(changed=True))
    added = _rowcount(
        session.execute(
            update(Subscriber)
            .where(Subscriber.email.in_(select(staging.c.email).where(staging.c.changed.is_(True))))
            .values(version=Subscriber.version + 1)
            .execution_options(synchronize_session=False)
        )
    )
    stmt = insert_for(session)(Preference).from_select(
        ["subscriber_id", "topic_id", "subscribed", "version", "source", "updated_at"],
        select(Subscriber.id, literal(topic_id), false(), Subscriber.version, literal(SOURCE), staging.c.at)
        .join(staging, and_(staging.c.email == Subscriber.email, staging.c.changed.is_(True)))
        # SQLite needs a WHERE before ON CONFLICT to tell it from a join's ON
        .where(true()),
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[Preference.subscriber_id, Preference.topic_id],
            set_={
                "subscribed": False,
                "version": stmt.excluded.version,
                "source": SOURCE,
                "updated_at": stmt.excluded.updated_at,
            },
        )
    )
    return added


def _rowcount(result: Any) -> int:
    return int(result.rowcount)
