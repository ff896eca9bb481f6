"""The suppression list and the change feed, paged by keyset and streamed in constant memory."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from ..errors import InvalidValue
from ..store import driver_rows
from .rules import Category, State, feed_change, verdict
from .topics import get_topic

STREAM_BATCH = 5000
# judges "all marketing": a topic no explicit choice names
_ANY_TOPIC = Category("*")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a feed and where the next one starts; for the change feed, how far behind it is."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    lag_seconds: float = 0.0


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
    # a stored id is a signed 64-bit integer: SQLite cannot even compare a larger one
    if len(parts) != size or any(p < 0 or p >= 2**63 for p in parts):
        raise InvalidValue("the cursor is not one this service gave out")
    return parts


# plain driver SQL: a million rows need no SQLAlchemy row objects or datetime parsing
_TOPIC_CANDIDATES = (
    "SELECT s.id, s.email, s.left_all_reason, s.left_all_version, {iso_s_left_all_at},"
    " p.subscribed, p.version, {iso_p_updated_at}, p.source, s.bounced_at IS NOT NULL FROM subscribers s"
    " LEFT JOIN preferences p ON p.subscriber_id = s.id AND p.topic_id = {topic_id}"
    # candidates only: the verdict below decides who is suppressed
    " WHERE s.id > {mark} AND (s.left_all_reason IS NOT NULL OR NOT p.subscribed)"
    " ORDER BY s.id LIMIT {limit}"
)
_ALL_CANDIDATES = (
    "SELECT s.id, s.email, s.left_all_reason, s.left_all_version, {iso_s_left_all_at},"
    " s.bounced_at IS NOT NULL FROM subscribers s"
    " WHERE s.id > {mark} AND s.left_all_reason IS NOT NULL ORDER BY s.id LIMIT {limit}"
)
# who among a page's subscribers has chosen a topic since: a range of the preferences' key,
# read once a page (a correlated NOT EXISTS probed the index for every row, and PostgreSQL
# chose a merge anti-join that read every preference from the first subscriber on)
_CHOSEN_AGAIN = (
    "SELECT p.subscriber_id, p.source, max(p.version) FROM preferences p"
    " WHERE p.subscriber_id > {mark} AND p.subscriber_id <= {mark} AND p.subscribed"
    " GROUP BY p.subscriber_id, p.source"
)
_CHANGES = (
    "SELECT e.txid, e.id, e.action, e.reason, {iso_e_created_at}, s.email, t.key FROM events e"
    " JOIN subscribers s ON s.id = e.subscriber_id LEFT JOIN topics t ON t.id = e.topic_id"
    " WHERE (e.txid, e.id) > ({mark}, {mark}) AND e.txid < {below} ORDER BY e.txid, e.id LIMIT {limit}"
)
# On PostgreSQL a transaction still open may hold a smaller txid than rows already committed,
# so the feed reads below a horizon: the oldest transaction that may still write this
# database's events. Ids are the whole server's, and a snapshot's xmin waits for every
# transaction in every database. Every prefs write takes a write lock on ``events`` before it
# is given an id and keeps it to its end (db.WRITER_LOCK). So the horizon statement takes a
# snapshot, then reads the lock table: an id of that snapshot still running counts if its
# transaction holds that lock, and is passed over if it is shown running without it. An id
# the lock table does not show (given a moment ago, or ended since the snapshot) counts only
# if the page's own statement, later and with a later snapshot, still sees it running: a
# writer that ended before that snapshot is seen there, committed or not. A writer that
# ended after the lock table was read was shown holding the lock, or missing from it; so
# the page never reads past a change that commits later. Without such ids the horizon is the
# horizon statement's snapshot's xmax.
_HORIZON = """
WITH snapshot AS MATERIALIZED (SELECT pg_current_snapshot() AS taken),
locks AS MATERIALIZED (
  SELECT locktype, database, relation, mode, granted, virtualtransaction, transactionid, pid FROM pg_locks
),
writers AS (
  SELECT virtualtransaction FROM locks
  WHERE locktype = 'relation' AND relation = 'events'::regclass
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
),
owners AS (
  SELECT transactionid::text::bigint AS xid, virtualtransaction, pid FROM locks
  WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted
),
running AS MATERIALIZED (
  -- the lock table's ids are the low 32 bits
  SELECT x::text::bigint AS txid, x::text::bigint & 4294967295 AS xid, o.pid, o.xid IS NULL AS unshown,
    o.virtualtransaction IN (SELECT virtualtransaction FROM writers) AS writing
  FROM snapshot, pg_snapshot_xip(taken) AS x LEFT JOIN owners o ON o.xid = x::text::bigint & 4294967295
),
oldest AS (SELECT txid, xid, pid FROM running WHERE writing ORDER BY txid LIMIT 1),
bound AS (
  SELECT coalesce(oldest.txid, pg_snapshot_xmax(taken)::text::bigint) AS txid
  FROM snapshot LEFT JOIN oldest ON true
)
SELECT current_setting('transaction_isolation'), bound.txid,
  ARRAY(SELECT txid FROM running WHERE unshown AND txid < bound.txid ORDER BY txid),
  -- how long the oldest write still open has held back changes committed since it began
  CASE WHEN waiting.txid IS NOT NULL THEN
    extract(epoch FROM statement_timestamp() - coalesce(
      (SELECT xact_start FROM pg_stat_activity a
       WHERE a.pid = oldest.pid AND a.backend_xid::text::bigint = oldest.xid),
      (SELECT prepared FROM pg_prepared_xacts WHERE transaction::text::bigint = oldest.xid),
      statement_timestamp()
    ))::float8
  END
FROM bound LEFT JOIN oldest ON true
  -- one probe of the (txid, id) index, none at all without a writer
  LEFT JOIN LATERAL (
    SELECT txid FROM events WHERE txid >= oldest.txid ORDER BY txid LIMIT 1
  ) AS waiting ON true
"""
# the page's statement: below the oldest of the ids still running in its own snapshot, else the bound
_BELOW = (
    "coalesce((SELECT min(u) FROM unnest({mark}::bigint[]) AS u"
    " WHERE NOT pg_visible_in_snapshot(u::text::xid8, pg_current_snapshot())), {mark})"
)
_EVERYTHING = 2**63 - 1


# each stored time, written by the database as the API writes it (ISO 8601, UTC, "Z", to the
# microsecond): a million rows need no datetime objects made and formatted one by one
_ISO = {
    "postgresql": "to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" (UTC); rows loaded by other tools may say "+00:00"
    "sqlite": "replace(replace({column}, ' ', 'T'), '+00:00', '') || 'Z'",
}
_TIMES = ("s.left_all_at", "p.updated_at", "e.created_at")


def _rows(session: Session, sql: str, params: tuple[Any, ...], **parts: Any) -> list[tuple[Any, ...]]:
    """Run one read with the driver's cursor and return its rows as plain tuples."""
    dialect = session.get_bind().dialect.name
    mark = "%s" if dialect == "postgresql" else "?"
    iso = {f"iso_{c.replace('.', '_')}": _ISO[dialect].format(column=c) for c in _TIMES}
    # every piece of the text is a constant or an int; values are parameters
    return driver_rows(session, sql.format(mark=mark, **iso, **parts), params)


# one suppressed address: email, scope (a topic key or "all"), reason, since (ISO 8601)
Suppression = tuple[str, str, "str | None", "str | None"]


def suppressions(
    session: Session, topic_key: str | None, after: int, limit: int
) -> tuple[list[Suppression], int | None]:
    """Return the suppressed addresses after subscriber id ``after``, and the id to go on from."""
    if topic_key is None:
        return _all_suppressions(session, after, limit)
    topic = get_topic(session, topic_key)
    category = Category(topic.key, topic.opt_in)
    rows = _rows(session, _TOPIC_CANDIDATES, (after,), topic_id=int(topic.id), limit=int(limit))
    items: list[Suppression] = []
    for _sid, email, left, left_version, left_at, subscribed, version, updated, source, bounced in rows:
        subscribed = None if subscribed is None else bool(subscribed)
        judged = verdict(
            State(False, left, left_version, subscribed, version, source, bool(bounced)), category
        )
        if judged.allowed:
            continue
        if judged.reason == "unsubscribed":
            items.append((email, topic.key, "unsubscribed", updated))
        else:
            items.append((email, "all", judged.reason, left_at))
    last = rows[-1][0] if len(rows) == limit else None
    return items, last


class _LeftAllReasons(dict[tuple[str, "int | None"], "str | None"]):
    """The verdict's reason for each (left_all_reason, left_all_version) a batch holds, asked once."""

    def __missing__(self, key: tuple[str, int | None]) -> str | None:
        reason = self[key] = verdict(State(False, *key), _ANY_TOPIC).reason
        return reason


def _all_suppressions(session: Session, after: int, limit: int) -> tuple[list[Suppression], int | None]:
    fetched = rows = _rows(session, _ALL_CANDIDATES, (after,), limit=int(limit))
    chosen: dict[int, list[tuple[str, int]]] = {}
    for sid, source, version in _rows(session, _CHOSEN_AGAIN, (after, rows[-1][0])) if rows else ():
        chosen.setdefault(sid, []).append((source, version))
    if chosen:
        # a topic chosen after leaving all marketing, by one who may lift the reason (the
        # rule decides), takes the subscriber off the list
        rows = [r for r in rows if r[3] is None or r[0] not in chosen or not _chose_again(r, chosen[r[0]])]
    # tuples straight from the rows: the export writes a million of them, with a handful of
    # distinct states among them, so the verdict is asked once a state, not once a row
    reasons = _LeftAllReasons()
    items: list[Suppression] = [
        (email, "all", reasons[left, left_version], left_at)
        for _sid, email, left, left_version, left_at, _bounced in rows
    ]
    last = fetched[-1][0] if len(fetched) == limit else None
    return items, last


def _chose_again(row: tuple[Any, ...], choices: Any) -> bool:
    """Tell whether one of a subscriber's later choices brings a topic back, as the rule says."""
    _sid, _email, left, left_version, _at, bounced = row
    return any(
        verdict(State(False, left, left_version, True, version, source, bool(bounced)), _ANY_TOPIC).allowed
        for source, version in choices
    )


def as_item(row: Suppression) -> dict[str, Any]:
    """Return a suppression as the API's JSON names its fields."""
    email, scope, reason, since = row
    return {"email": email, "scope": scope, "reason": reason, "since": since}


def suppression_page(session: Session, topic_key: str | None, cursor: str | None, limit: int) -> Page:
    """Return one page of the suppression list."""
    after = decode_cursor(cursor, 1)[0] if cursor else 0
    rows, last = suppressions(session, topic_key, after, limit)
    return Page([as_item(row) for row in rows], None if last is None else encode_cursor(last))


def stream_suppressions(session: Session, topic_key: str | None) -> Iterator[list[Suppression]]:
    """Yield the whole suppression list a batch at a time, one batch in memory.

    The batches are as consistent as the caller's transaction: ``db.read_snapshot`` makes
    them one snapshot.
    """
    if topic_key is not None:
        get_topic(session, topic_key)
    after: int | None = 0
    while after is not None:
        rows, after = suppressions(session, topic_key, after, STREAM_BATCH)
        if rows:
            yield rows


def change_page(session: Session, cursor: str | None, limit: int) -> Page:
    """Return the changes after ``cursor``, in commit-safe order, and the cursor to go on from.

    On PostgreSQL the session must be in READ COMMITTED (the default): the page is read
    with a snapshot taken after the horizon's.
    """
    txid, event_id = decode_cursor(cursor, 2) if cursor else (0, 0)
    lag = None
    if session.get_bind().dialect.name == "postgresql":
        isolation, bound, unshown, lag = driver_rows(session, _HORIZON, None)[0]
        if isolation != "read committed":  # the page's statement would not see a later snapshot
            raise RuntimeError(f"the change feed is read in READ COMMITTED, not {isolation.upper()}")
        rows = _rows(
            session,
            _CHANGES,
            (txid, event_id, unshown, bound),
            below=_BELOW.format(mark="%s"),
            limit=int(limit),
        )
    else:
        # SQLite's writers take turns, so ids follow commit order: every committed row is readable
        rows = _rows(session, _CHANGES, (txid, event_id, _EVERYTHING), below="?", limit=int(limit))
    items = []
    for row_txid, row_id, action, reason, at, email, key in rows:
        txid, event_id = row_txid, row_id
        changed = feed_change(action, reason, key)
        if changed is None:
            continue
        change, why = changed
        items.append({"email": email, "change": change, "scope": key or "all", "reason": why, "at": at})
    # the last page has a cursor too: a mailer resumes from it later
    return Page(items, encode_cursor(txid, event_id), round(max(0.0, lag or 0.0), 3))
