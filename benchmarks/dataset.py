"""Build the benchmark's data set straight into the database, in bulk."""

from __future__ import annotations

import random
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

TOPICS = ("news", "promotions", "events", "partners", "product")
BATCH = 50_000
RESERVED = 1 << 40


@dataclass
class Database:
    """A benchmark database: a SQLite file or a PostgreSQL database made for the run."""

    kind: str
    url: str  # SQLAlchemy URL for the service
    path: str = ""  # SQLite file
    dsn: str = ""  # PostgreSQL libpq DSN
    size: int = 0  # subscribers so far
    topic_ids: dict[str, int] = field(default_factory=dict)

    def connect(self) -> Any:
        """Return a plain driver connection."""
        if self.kind == "sqlite":
            return sqlite3.connect(self.path, isolation_level=None)
        return psycopg.connect(self.dsn, autocommit=True)

    @property
    def mark(self) -> str:
        return "?" if self.kind == "sqlite" else "%s"

    @property
    def txid(self) -> str:
        """The SQL for the writing transaction's id, as the service stores it in events."""
        return "0" if self.kind == "sqlite" else "pg_current_xact_id()::text::bigint"


def address(i: int) -> str:
    """Return the address of subscriber number ``i`` (normalized already)."""
    return f"user{i}@example{i % 97}.com"


def public_id(i: int) -> str:
    """Return a 16-character public id for subscriber number ``i``."""
    return f"b{i:015d}"


def command_env(db: Database) -> dict[str, str]:
    """Return the environment a ``flask --app prefs`` command runs in against ``db``."""
    return {
        "PREFS_DATABASE_URL": db.url,
        "PREFS_SECRET_KEYS": "benchmark-key-0123456789",
        "PREFS_BASE_URL": "https://prefs.example.com",  # every command needs one, as in production
        "PATH": "/usr/bin:/bin",
    }


def create_schema(db: Database) -> None:
    """Build the schema with the service's own migrations."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "prefs", "db", "upgrade"],
        env=command_env(db),
        check=True,
        capture_output=True,
    )
    with db.connect() as conn:
        if db.kind == "sqlite":
            conn.execute("PRAGMA journal_mode=WAL")
        for key in TOPICS:
            conn.execute(
                f"INSERT INTO topics (key, name, description, opt_in, archived, created_at)"
                f" VALUES ({db.mark}, {db.mark}, '', {db.mark}, {db.mark}, CURRENT_TIMESTAMP)",
                (key, key.title(), False, False),
            )
        rows = conn.execute("SELECT key, id FROM topics").fetchall()
        db.topic_ids = dict(rows)
        # the data set takes ids 1..N as it grows; rows the service creates meanwhile (new
        # recipients of a check) must land above them
        if db.kind == "sqlite":
            conn.execute(
                "INSERT INTO subscribers (id, public_id, email, version, created_at)"
                " VALUES (?, 'bsentinel0000000', 'sentinel@bench.example.org', 0, CURRENT_TIMESTAMP)",
                (RESERVED,),
            )
        else:
            conn.execute("SELECT setval('subscribers_id_seq', %s)", (RESERVED,))
        # the one-click floor's table, in the same database
        kind = "INTEGER PRIMARY KEY" if db.kind == "sqlite" else "BIGSERIAL PRIMARY KEY"
        conn.execute(f"CREATE TABLE bench_floor (id {kind}, token TEXT, at DOUBLE PRECISION)")


def grow(db: Database, size: int, seed: int = 7) -> float:
    """Add subscribers up to ``size``, with the issue's mix of opt-outs; return the seconds taken."""
    started = time.perf_counter()
    rng = random.Random(seed + db.size)
    news = db.topic_ids["news"]
    with db.connect() as conn:
        for start in range(db.size, size, BATCH):
            numbers = range(start, min(start + BATCH, size))
            subscribers, preferences = [], []
            for i in numbers:
                roll = rng.random()
                reason = None
                if roll < 0.02:
                    reason = "unsubscribed"
                elif roll < 0.025:
                    reason = "complained"
                elif roll < 0.03:
                    reason = "bounced"
                left_at = "2026-11-02T00:00:00+00:00" if reason else None
                bounced_at = left_at if reason == "bounced" else None
                version = 2 if reason else 1
                subscribers.append(
                    (
                        i + 1,
                        public_id(i),
                        address(i),
                        version,
                        reason,
                        version if reason else None,
                        left_at,
                        bounced_at,
                    )
                )
                if rng.random() < 0.10:
                    preferences.append((i + 1, news, False, 3, "import"))
            _copy(
                db,
                conn,
                "subscribers",
                (
                    "id",
                    "public_id",
                    "email",
                    "version",
                    "left_all_reason",
                    "left_all_version",
                    "left_all_at",
                    "bounced_at",
                ),
                subscribers,
            )
            _copy(
                db,
                conn,
                "preferences",
                ("subscriber_id", "topic_id", "subscribed", "version", "source"),
                preferences,
            )
        # a settled table, as autovacuum keeps one: statistics, and a visibility map that
        # lets PostgreSQL answer from an index alone
        conn.execute("VACUUM (ANALYZE) subscribers" if db.kind == "postgresql" else "ANALYZE")
        if db.kind == "postgresql":
            conn.execute("VACUUM (ANALYZE) preferences")
    db.size = size
    return time.perf_counter() - started


def _copy(db: Database, conn: Any, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    if not rows:
        return
    now = "2026-11-01T00:00:00+00:00"
    stamped = ("created_at",) if table == "subscribers" else ("updated_at",)
    names = ", ".join(columns + stamped)
    if db.kind == "sqlite":
        marks = ", ".join("?" * (len(columns) + 1))
        conn.execute("BEGIN")
        conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", [(*r, now) for r in rows])
        conn.execute("COMMIT")
        return
    with conn.cursor().copy(f"COPY {table} ({names}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row((*row, now))


def suppress_everyone(db: Database) -> None:
    """Take every subscriber out of all marketing, with one audit event each (export and sync)."""
    with db.connect() as conn:
        if db.kind == "sqlite":
            conn.execute("BEGIN")
        conn.execute(
            "UPDATE subscribers SET left_all_reason = 'unsubscribed', left_all_version = version + 1,"
            " version = version + 1, left_all_at = CURRENT_TIMESTAMP WHERE left_all_reason IS NULL"
        )
        conn.execute(
            "INSERT INTO events (txid, subscriber_id, topic_id, action, reason, source, created_at)"
            f" SELECT {db.txid}, id, NULL, 'unsubscribe', 'unsubscribed', 'import', CURRENT_TIMESTAMP"
            " FROM subscribers ORDER BY id"
        )
        if db.kind == "sqlite":
            conn.execute("COMMIT")
        conn.execute("ANALYZE")


def check_batch(db: Database, size: int, run: int, rng: random.Random) -> list[str]:
    """Return a check batch: 90% known, 9% new, 1% invalid, shuffled."""
    known_count, new_count = size * 90 // 100, size * 9 // 100
    batch = [address(i) for i in rng.sample(range(db.size), known_count)]
    batch += [f"new{run}-{i}-{secrets.token_hex(3)}@fresh{i % 13}.example.org" for i in range(new_count)]
    batch += [f"broken{i}@@example" for i in range(size - known_count - new_count)]
    rng.shuffle(batch)
    return batch


def one_click_targets(db: Database, count: int, rng: random.Random) -> Iterator[tuple[str, str]]:
    """Yield ``count`` distinct (public id, topic) pairs whose one-click opt-out is a real change."""
    topics = [t for t in TOPICS if t != "news"]  # nobody has a choice recorded for these yet
    if count > db.size * len(topics):
        raise ValueError(f"{count} distinct one-click targets need more than {db.size} subscribers")
    pairs = rng.sample(range(db.size * len(topics)), count)
    for n in pairs:
        yield public_id(n // len(topics)), topics[n % len(topics)]


# the overview's data set: sources as the service writes them, opt-outs spread over 200 days
SOURCES = ("one-click", "one-click", "page", "preferences", "api", "import", "mailto")
CAMPAIGNS = 500
DAYS = 200


def _numbers(db: Database, count: int) -> str:
    """Return SQL naming the rows 1..count as ``g(i)``."""
    if db.kind == "postgresql":
        return f"generate_series(1, {count}) AS g(i)"
    return f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) SELECT i FROM n) AS g"


def _pick(values: tuple[str | int, ...], index: str) -> str:
    """Return SQL choosing one of ``values`` by an integer expression."""
    cases = " ".join(
        f"WHEN {i} THEN {value if isinstance(value, int) else repr(value)}" for i, value in enumerate(values)
    )
    return f"CASE ({index}) % {len(values)} {cases} END"


def _ago(db: Database, days: str, seconds: str = "0") -> str:
    """Return SQL for the time ``days`` and ``seconds`` ago, stored as the service stores times."""
    if db.kind == "postgresql":
        return f"CURRENT_TIMESTAMP - make_interval(days => {days}, secs => {seconds})"
    # SQLAlchemy's text on SQLite, to the microsecond: the register's pages compare it as text
    return (
        f"strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+d days', -({days})),"
        f" printf('%+d seconds', -({seconds}))) || '000'"
    )


def _secondary_indexes(db: Database, conn: Any, table: str) -> list[tuple[str, str]]:
    """Return the name and the CREATE statement of each index on ``table`` that no constraint owns."""
    if db.kind == "postgresql":
        rows = conn.exec_driver_sql(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %(t)s AND indexname NOT IN"
            " (SELECT conname FROM pg_constraint)",
            {"t": table},
        )
    else:
        rows = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
            (table,),
        )
    return [(name, definition) for name, definition in rows]


def overview_data(db: Database, subscribers: int, events: int, open_requests: int) -> dict[str, float]:
    """Fill a fresh database for the overview figure with statements that generate the rows.

    The tables are written with the counting triggers out of the way and counted once at
    the end, as the migration that adds the counts does; both steps are timed.
    """
    from sqlalchemy import create_engine

    from prefs.store import tallies

    engine = create_engine(db.url)
    timings: dict[str, float] = {}
    topics = [db.topic_ids[key] for key in TOPICS]
    now = _ago(db, "0")
    pid = "'b' || lpad(CAST(i AS text), 15, '0')" if db.kind == "postgresql" else "printf('b%015d', i)"
    reason = _pick(("unsubscribed", "complained", "bounced"), "i")
    statements = {
        "subscribers": (
            "INSERT INTO subscribers (id, public_id, email, created_at, version, left_all_reason,"
            " left_all_version, left_all_at)"
            f" SELECT i, {pid}, 'user' || i || '@example' || (i % 97) || '.com', {now}, 2,"
            f" CASE WHEN i % 100 < 3 THEN {reason} END, CASE WHEN i % 100 < 3 THEN 2 END,"
            f" CASE WHEN i % 100 < 3 THEN {now} END FROM {_numbers(db, subscribers)}"
        ),
        # one in ten left the first topic; one in seventeen chose the second (after leaving all, for some)
        "preferences": (
            "INSERT INTO preferences (subscriber_id, topic_id, subscribed, version, source, updated_at)"
            f" SELECT i, {topics[0]}, false, 1, 'page', {now} FROM {_numbers(db, subscribers)} WHERE i % 10 = 0"
            f" UNION ALL SELECT i, {topics[1]}, true, 3, 'preferences', {now} FROM {_numbers(db, subscribers)}"
            " WHERE i % 17 = 0"
        ),
        "events": (
            "INSERT INTO events (txid, subscriber_id, topic_id, action, reason, source, campaign, created_at)"
            f" SELECT 1, 1 + (CAST(i AS BIGINT) * 7919) % {subscribers},"
            f" CASE WHEN i % 6 = 5 THEN NULL ELSE {_pick(tuple(topics), 'i')} END,"
            " CASE WHEN i % 10 = 9 THEN 'resubscribe' ELSE 'unsubscribe' END,"
            " CASE WHEN i % 6 = 5 THEN 'unsubscribed' END,"
            f" {_pick(SOURCES, 'i / 7')},"
            f" CASE WHEN i % 10 < 3 THEN 'camp' || ((i / 10) % {CAMPAIGNS}) END,"
            f" {_ago(db, f'i % {DAYS}', 'i % 86400')} FROM {_numbers(db, events)}"
        ),
        "campaign_sends": (
            "INSERT INTO campaign_sends (campaign, topic_id, allowed, first_at, last_at)"
            f" SELECT 'camp' || (i - 1), {topics[0]}, 20000 + i, {_ago(db, f'i % {DAYS}')},"
            f" {_ago(db, f'i % {DAYS}')} FROM {_numbers(db, CAMPAIGNS)}"
        ),
        # open ones received over the last 60 days (half of them overdue), and as many done
        "requests": (
            "INSERT INTO requests (type, email, fingerprint, label, received_at, due_at, completed_at, outcome, note)"
            f" SELECT {_pick(('access', 'erasure', 'objection', 'rectification'), 'i')},"
            " CASE WHEN i % 2 = 0 THEN 'user' || i || '@example.com' END, 'fp' || i, 'u***@example.com',"
            f" {_ago(db, 'i % 60', 'i % 86400')}, {_ago(db, 'i % 60 - 30', 'i % 86400')},"
            f" CASE WHEN i % 2 = 1 THEN {now} END, CASE WHEN i % 2 = 1 THEN 'done' END, ''"
            f" FROM {_numbers(db, 2 * open_requests)}"
        ),
    }
    with engine.begin() as conn:
        tallies.uninstall(conn)
        # the events' indexes are built once after the rows, not grown row by row
        indexes = _secondary_indexes(db, conn, "events")
        for name, _ in indexes:
            conn.exec_driver_sql(f"DROP INDEX {name}")
    for name, statement in statements.items():
        started = time.perf_counter()
        with engine.begin() as conn:
            if db.kind == "postgresql":
                # no foreign-key check a row: the generated rows refer to rows just made
                conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
                # psycopg reads % as a placeholder once any parameters are passed
                statement = statement.replace("%", "%%")
            conn.exec_driver_sql(statement)
            if name == "events":
                for _, definition in indexes:
                    conn.exec_driver_sql(definition)
        timings[name] = time.perf_counter() - started
    started = time.perf_counter()
    with engine.begin() as conn:
        tallies.install(conn)
        tallies.recount(conn)
    timings["count"] = time.perf_counter() - started
    with db.connect() as conn:
        conn.execute("VACUUM ANALYZE" if db.kind == "postgresql" else "ANALYZE")
    engine.dispose()
    db.size = subscribers
    return timings
