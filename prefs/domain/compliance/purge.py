"""Clear what forgetting an address leaves in the database's own files.

SQLite overwrites a deleted row at once (``secure_delete``, set on every connection), but
its write-ahead log still holds the pages as they were until a checkpoint empties it: one
follows each erasure and each completed request. PostgreSQL keeps a deleted row's bytes
in its table and index pages until VACUUM, and index pages until they are rebuilt; VACUUM
cannot run in a transaction, so ``flask --app prefs erasures purge`` does it, from cron.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ...store import write_gate

log = logging.getLogger(__name__)

# the tables whose rows held an address: the subscriber, and the register's open requests
ADDRESS_TABLES = ("subscribers", "requests")
# how long a checkpoint waits for readers; it holds writers back meanwhile, so briefly
CHECKPOINT_WAIT_MS = 1000


def after_forgetting(session: Session) -> None:
    """Once an address is forgotten and committed, empty SQLite's log of the pages that held it."""
    engine = session.get_bind().engine
    if engine.dialect.name == "sqlite" and not checkpoint(engine):
        log.warning("the SQLite log could not be emptied now; erasures purge empties it later")


def checkpoint(engine: Engine) -> bool:
    """Copy SQLite's write-ahead log into the database and truncate it; tell whether it completed."""
    with write_gate(engine):
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            (configured,) = cursor.execute("PRAGMA busy_timeout").fetchone()
            cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
            try:
                busy, _frames, _copied = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                cursor.execute(f"PRAGMA busy_timeout={int(configured)}")
            cursor.close()
        finally:
            raw.close()
    return not busy


def purge(engine: Engine, full: bool = False) -> list[str]:
    """Clear the bytes of deleted rows that held an address; return what was run.

    PostgreSQL: VACUUM removes dead rows and their index entries; ANALYZE takes a new
    sample of the columns for the planner's statistics (the old one may hold the address),
    and the statistics catalog is vacuumed (the database's owner may; others are skipped
    with a warning); REINDEX CONCURRENTLY
    rebuilds every index of the subscribers (an index page keeps a removed entry's bytes
    until it is rewritten); the small request register is rewritten whole. ``full``
    rewrites the subscribers too (VACUUM FULL): without it, a table page may keep a dead
    row's bytes in its free space until a new row is written there. VACUUM FULL holds an
    exclusive lock on the table while it runs: seconds per million subscribers.
    """
    if engine.dialect.name == "sqlite":
        done = checkpoint(engine)
        return ["wal_checkpoint(TRUNCATE)" + ("" if done else ": busy, readers held the log; run again")]
    tables = ", ".join(ADDRESS_TABLES)
    # a plain VACUUM first: it removes the dead rows whatever runs in other databases, while
    # VACUUM FULL's own snapshot would keep those that a transaction anywhere might still see;
    # ANALYZE replaces the planner's sample of the columns' values (pg_statistic)
    statements = [f"VACUUM (INDEX_CLEANUP ON, ANALYZE) {tables}", "VACUUM pg_catalog.pg_statistic"]
    if full:
        statements += [f"VACUUM (FULL) {tables}", "VACUUM (FULL) pg_catalog.pg_statistic"]
    else:
        statements += ["VACUUM (FULL) requests", "REINDEX TABLE CONCURRENTLY subscribers"]
    # VACUUM and REINDEX CONCURRENTLY cannot run inside a transaction
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    return statements
