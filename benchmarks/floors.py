"""The floors: the same work done by the database driver alone, in the same run."""

from __future__ import annotations

import csv
import io
import itertools
import time
from typing import Any

from .dataset import Database

CHUNK = 5000


def lookup(db: Database, addresses: list[str]) -> float:
    """Look the normalized addresses up in batches, with their topic state; return seconds.

    The best plain lookup the driver can do: on a connection already open and warmed (its
    statement planned once), the addresses sorted as the service sorts them, so neighbouring
    probes share index pages. The service is held to this, not to a handicapped floor.
    """
    news = db.topic_ids["news"]

    def query(chunk: list[str]) -> tuple[str, Any]:
        if db.kind == "sqlite":  # "IN (?, ...)": one text per chunk size
            where = f" WHERE s.email IN ({','.join('?' * len(chunk))})"
            return _LOOKUP.format(source="subscribers s", news=news) + where, chunk
        source = "unnest(%s::text[]) AS wanted(email) JOIN subscribers s ON s.email = wanted.email"
        return _LOOKUP.format(source=source, news=news), (chunk,)

    with db.connect() as conn:
        cursor = conn.cursor()
        cursor.execute(*query(addresses[:1]))
        cursor.fetchall()
        started = time.perf_counter()
        ordered = sorted(addresses)
        for start in range(0, len(ordered), CHUNK):
            chunk = ordered[start : start + CHUNK]
            cursor.execute(*query(chunk))
            cursor.fetchall()
        return time.perf_counter() - started


_LOOKUP = (
    "SELECT s.email, s.public_id, s.left_all_reason, s.left_all_version, p.subscribed, p.version"
    " FROM {source} LEFT JOIN preferences p ON p.subscriber_id = s.id AND p.topic_id = {news}"
)


def export(db: Database) -> tuple[int, float]:
    """Write every suppressed address as CSV with the driver's own cursor; return rows, seconds."""
    started = time.perf_counter()
    sink = io.StringIO()
    writer = csv.writer(sink)
    rows = 0
    with db.connect() as conn:
        if db.kind == "postgresql":
            conn.autocommit = False  # a server-side cursor lives in a transaction
        cursor = conn.cursor(name="floor") if db.kind == "postgresql" else conn.cursor()
        cursor.execute(
            "SELECT email, left_all_reason, left_all_at FROM subscribers"
            " WHERE left_all_reason IS NOT NULL ORDER BY id"
        )
        while batch := cursor.fetchmany(5000):
            for row in batch:
                writer.writerow(row)
                rows += 1
            sink.seek(0)
            sink.truncate()
        cursor.close()
    return rows, time.perf_counter() - started


def keyset(db: Database, page: int) -> tuple[int, float]:
    """Read every change by keyset, ``page`` rows at a time; return rows, seconds."""
    started = time.perf_counter()
    rows, txid, event_id = 0, 0, 0
    m = db.mark
    with db.connect() as conn:
        cursor = conn.cursor()
        while True:
            cursor.execute(
                "SELECT e.txid, e.id, e.action, e.reason, e.created_at, s.email, t.key FROM events e"
                " JOIN subscribers s ON s.id = e.subscriber_id LEFT JOIN topics t ON t.id = e.topic_id"
                f" WHERE (e.txid, e.id) > ({m}, {m}) ORDER BY e.txid, e.id LIMIT {int(page)}",
                (txid, event_id),
            )
            batch = cursor.fetchall()
            if not batch:
                break
            rows += len(batch)
            txid, event_id = batch[-1][0], batch[-1][1]
    return rows, time.perf_counter() - started


def suppress_file(db: Database, path: str, batch: int = 5000, per_commit: int = 5) -> tuple[int, float]:
    """Insert a suppression CSV's rows with the driver: subscribers out of all marketing, an event
    each, committing every ``per_commit`` batches as the import does; return rows, seconds."""
    started = time.perf_counter()
    m = db.mark
    now = "2026-11-01T00:00:00+00:00"
    rows = 0
    with db.connect() as conn, open(path, newline="") as f:
        cursor = conn.cursor()
        reader = csv.reader(f)
        next(reader)
        done = False
        while not done:
            cursor.execute("BEGIN")
            last = cursor.execute("SELECT coalesce(max(id), 0) FROM subscribers").fetchone()[0]
            for _ in range(per_commit):
                chunk = [
                    (f"f{rows + i:015d}", email.strip().lower(), now)
                    for i, (email, _created) in enumerate(itertools.islice(reader, batch))
                ]
                if not chunk:
                    done = True
                    break
                rows += len(chunk)
                cursor.executemany(
                    "INSERT INTO subscribers (public_id, email, version, left_all_reason, left_all_version,"
                    f" left_all_at, created_at) VALUES ({m}, {m}, 1, 'unsubscribed', 1, {m}, CURRENT_TIMESTAMP)",
                    chunk,
                )
            cursor.execute(
                "INSERT INTO events (txid, subscriber_id, topic_id, action, reason, source, created_at)"
                f" SELECT {db.txid}, id, NULL, 'unsubscribe', 'unsubscribed', 'import', left_all_at"
                f" FROM subscribers WHERE id > {m} ORDER BY id",
                (last,),
            )
            cursor.execute("COMMIT")
    return rows, time.perf_counter() - started
