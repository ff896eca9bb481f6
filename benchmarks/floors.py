"""The floors: the same work done by the database driver alone, in the same run."""

from __future__ import annotations

import csv
import io
import time

from .dataset import Database

CHUNK = 5000


def lookup(db: Database, addresses: list[str]) -> float:
    """Look the normalized addresses up in batches, with their topic state; return seconds."""
    news = db.topic_ids["news"]
    started = time.perf_counter()
    with db.connect() as conn:
        cursor = conn.cursor()
        for start in range(0, len(addresses), CHUNK):
            chunk = addresses[start : start + CHUNK]
            # the best plain query for each database (the same shape the service uses)
            if db.kind == "sqlite":
                source, where, params = (
                    "subscribers s",
                    f" WHERE s.email IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
            else:
                source = "unnest(%s::text[]) AS wanted(email) JOIN subscribers s ON s.email = wanted.email"
                where, params = "", (chunk,)
            cursor.execute(
                "SELECT s.email, s.public_id, s.left_all_reason, s.left_all_version, p.subscribed, p.version"
                f" FROM {source} LEFT JOIN preferences p ON p.subscriber_id = s.id AND p.topic_id = {news}{where}",
                params,
            )
            cursor.fetchall()
    return time.perf_counter() - started


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
