"""The overview's running counts, kept by the database's own triggers as rows change.

Every write to ``subscribers``, ``preferences`` and ``events``, whoever makes it (the
one-click layer, a page, the API, an import, an erasure, an operator's SQL), adjusts the
counts in the same transaction, so they can never disagree with the rows and cost the
overview a few small reads instead of aggregating whole tables.

- ``audience_tallies``: per topic, its preferences by class (``stayed_on``, ``stayed_off``:
  the subscriber never left all marketing; ``again_on``: chosen since leaving all;
  ``left_on``: chosen before leaving all; ``left_off``); topic 0 holds ``everyone`` and
  ``left_all``. ``prefs.overview.audiences`` turns them into the verdict's figures.
- ``opt_out_tallies``: unsubscribe events per UTC day, topic (0: all marketing) and source.
- ``campaign_tallies``: unsubscribe events per campaign.

Each count is split over ``shard`` rows that are added up when read. On PostgreSQL a
transaction writes only the shards it holds an advisory lock on (the lowest free one), so
concurrent writers never wait on, or deadlock over, one hot counter row, and a count
has at most as many rows as transactions ever wrote it at once. SQLite has one writer at a
time: its shard is always 0, as is the one ``recount`` writes.

Row triggers count single changes (the same on both databases); on PostgreSQL a statement
writing many rows is counted once, over its transition table, in a transaction that says
it is bulk (``bulk``).

A later change to a trigger or function needs a migration of its own that runs
``install`` again (it replaces what is there).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from .postgresql import BULK_SETTING, pg_statements
from .triggers import (
    KEYS,
    LOCK_SPACE,
    add,
    event_deltas,
    preference_class,
    row_triggers,
    sqlite_statements,
    table_of,
)


def bulk(session: Any) -> None:
    """Within a write transaction: count its statements as sets, not row by row (PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SELECT set_config('{BULK_SETTING}', 'on', true)"))


def statements(dialect: str) -> list[str]:
    """Return the statements that install (or replace) the triggers on ``dialect``."""
    return pg_statements() if dialect == "postgresql" else sqlite_statements()


def install(connection: Any) -> None:
    """Install the triggers that keep the tallies, replacing any there are."""
    for statement in statements(connection.dialect.name):
        connection.exec_driver_sql(statement)


def uninstall(connection: Any) -> None:
    """Remove the triggers and their functions (a downgrade)."""
    postgresql = connection.dialect.name == "postgresql"
    for name, follows, _, _ in row_triggers(connection.dialect.name, "0"):
        table = table_of(follows)
        connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}" + (f" ON {table}" if postgresql else ""))
        if postgresql:
            connection.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}_bulk ON {table}")
            connection.exec_driver_sql(f"DROP FUNCTION IF EXISTS prefs_{name}()")
    if postgresql:
        connection.exec_driver_sql("DROP TRIGGER IF EXISTS forget_preferences ON subscribers")
        for function in ("tally_subscribers", "tally_preferences", "tally_events", "forget_preferences"):
            connection.exec_driver_sql(f"DROP FUNCTION IF EXISTS prefs_{function}()")
        connection.exec_driver_sql("DROP FUNCTION IF EXISTS prefs_tally_slot()")


def recount(connection: Any) -> None:
    """Put the counts right by a full count of the tables, in the caller's transaction.

    Writers go on meanwhile: each table's statement reads the rows and the counts in one
    snapshot and adds the difference to shard 0, so a change committed while it runs is
    counted once, by its trigger. Recounts take turns (an advisory lock on shard 0, taken
    before any snapshot). The migration that adds the counts runs it once.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({LOCK_SPACE}, 0)")
    kind = preference_class("s.left_all_reason", "s.left_all_version", "p.subscribed", "p.version")
    days, campaigns = event_deltas(dialect, "r", " FROM events r", 1)
    rows = {
        "audience_tallies": (
            "SELECT 0 AS topic_id, 'everyone' AS kind, 1 AS n FROM subscribers"  # noqa: S608
            " UNION ALL SELECT 0, 'left_all', 1 FROM subscribers WHERE left_all_reason IS NOT NULL"
            f" UNION ALL SELECT p.topic_id, {kind}, 1 FROM preferences p"
            " JOIN subscribers s ON s.id = p.subscriber_id"
        ),
        "opt_out_tallies": days,
        "campaign_tallies": campaigns,
    }
    for table, counted in rows.items():
        keys = ", ".join(KEYS[table])
        # what the rows say, less what the counts say: the difference
        difference = f"{counted} UNION ALL SELECT {keys}, -n FROM {table}"  # noqa: S608
        connection.exec_driver_sql(add(table, difference, "0"))
