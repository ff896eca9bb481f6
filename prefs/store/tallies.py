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

# advisory lock space of the shards ("pref"), and how many shards a count may have
LOCK_SPACE = 1886545254
SLOTS = 64


def preference_class(reason: str, left_version: str, subscribed: str, version: str) -> str:
    """Return the SQL of a preference's class, from its subscriber's and its own columns."""
    return (
        f"CASE WHEN {reason} IS NULL THEN CASE WHEN {subscribed} THEN 'stayed_on' ELSE 'stayed_off' END"
        f" WHEN NOT {subscribed} THEN 'left_off'"
        f" WHEN {version} > COALESCE({left_version}, 0) THEN 'again_on' ELSE 'left_on' END"
    )


def utc_day(dialect: str, column: str) -> str:
    """Return the SQL of the UTC day of a stored time."""
    if dialect == "postgresql":
        return f"CAST(({column} AT TIME ZONE 'UTC') AS DATE)"
    return f"date({column})"


_KEYS = {
    "audience_tallies": ("topic_id", "kind"),
    "opt_out_tallies": ("day", "topic_id", "source"),
    "campaign_tallies": ("campaign",),
}


def _add(table: str, deltas: str, shard: str, grouped: bool = True) -> str:
    """Return the statement that adds the rows of ``deltas`` (its keys and ``n``) to ``table``.

    ``grouped``: the rows may name one count twice (a row's old and new values), so they
    are added up first; a single row's own deltas each name another count and need not be.
    """
    keys = ", ".join(_KEYS[table])
    # every part is this module's own constant SQL, never a value. "WHERE true": SQLite's
    # parser needs a WHERE before ON CONFLICT in INSERT ... SELECT
    total, group = ("sum(n)", f" GROUP BY {keys} HAVING sum(n) <> 0") if grouped else ("n", "")
    return (
        f"INSERT INTO {table} ({keys}, shard, n) SELECT {keys}, {shard}, {total} FROM ({deltas}) AS d"  # noqa: S608
        f" WHERE true{group} ON CONFLICT ({keys}, shard) DO UPDATE SET n = {table}.n + excluded.n"
    )


# --- what one set of rows adds (sign 1) or takes away (sign -1) ---------------------------
# ``source`` is a FROM clause naming the rows ``r`` (PostgreSQL's transition table), or empty
# with ``r`` standing for SQLite's NEW or OLD


def _subscriber_deltas(r: str, source: str, sign: int) -> str:
    return (
        f"SELECT 0 AS topic_id, 'everyone' AS kind, {sign} AS n{source}"
        f" UNION ALL SELECT 0, 'left_all', {sign}{source} WHERE {r}.left_all_reason IS NOT NULL"
    )


def _preference_deltas(p: str, source: str, sign: int) -> str:
    kind = preference_class("s.left_all_reason", "s.left_all_version", f"{p}.subscribed", f"{p}.version")
    return f"SELECT {p}.topic_id AS topic_id, {kind} AS kind, {sign} AS n{source}"


def _reclassified(prefs_of: str, old: tuple[str, str], new: tuple[str, str], where: str) -> str:
    """Return the deltas of a subscriber's preferences when its leaving-all columns change."""
    before = preference_class(*old, "p.subscribed", "p.version")
    after = preference_class(*new, "p.subscribed", "p.version")
    return (
        f"SELECT p.topic_id AS topic_id, {before} AS kind, -1 AS n{prefs_of} WHERE {where}"
        f" UNION ALL SELECT p.topic_id, {after}, 1{prefs_of} WHERE {where}"
    )


def _event_deltas(dialect: str, r: str, source: str, sign: int) -> tuple[str, str]:
    where = f" WHERE {r}.action = 'unsubscribe'"
    days = (
        f"SELECT {utc_day(dialect, f'{r}.created_at')} AS day, COALESCE({r}.topic_id, 0) AS topic_id,"
        f" {r}.source AS source, {sign} AS n{source}{where}"
    )
    campaigns = f"SELECT {r}.campaign AS campaign, {sign} AS n{source}{where} AND {r}.campaign IS NOT NULL"
    return days, campaigns


# --- the row triggers, on both databases ----------------------------------------------------


def _distinct(dialect: str, a: str, b: str) -> str:
    return f"{a} IS DISTINCT FROM {b}" if dialect == "postgresql" else f"{a} IS NOT {b}"


def _row_triggers(dialect: str, slot: str) -> list[tuple[str, str, str | None, list[str]]]:
    """Return each row trigger: its name, what it follows, its condition, its statements."""
    audience = "audience_tallies"
    of_subscriber = " FROM subscribers s WHERE s.id = {r}.subscriber_id"
    left_all_delta = (
        "SELECT 0 AS topic_id, 'left_all' AS kind, CAST(NEW.left_all_reason IS NOT NULL AS integer)"
        " - CAST(OLD.left_all_reason IS NOT NULL AS integer) AS n"
        " WHERE (NEW.left_all_reason IS NULL) <> (OLD.left_all_reason IS NULL)"
    )
    reclassified = _reclassified(
        " FROM preferences p",
        ("OLD.left_all_reason", "OLD.left_all_version"),
        ("NEW.left_all_reason", "NEW.left_all_version"),
        "p.subscriber_id = NEW.id",
    )
    moved = (
        f"({_distinct(dialect, 'OLD.left_all_reason', 'NEW.left_all_reason')}"
        f" OR {_distinct(dialect, 'OLD.left_all_version', 'NEW.left_all_version')})"
    )
    new_prefs = _preference_deltas("NEW", of_subscriber.format(r="NEW"), 1)
    old_prefs = _preference_deltas("OLD", of_subscriber.format(r="OLD"), -1)
    new_days, new_campaigns = _event_deltas(dialect, "NEW", "", 1)
    old_days, old_campaigns = _event_deltas(dialect, "OLD", "", -1)
    # a subscriber's preferences go first, while it is there to classify them (a foreign
    # key's cascade would delete them after it); PostgreSQL does so in a trigger of its own
    forget = ["DELETE FROM preferences WHERE subscriber_id = OLD.id"] if dialect == "sqlite" else []
    return [
        ("tally_subscribers_insert", "AFTER INSERT ON subscribers", None,
         [_add(audience, _subscriber_deltas("NEW", "", 1), slot, grouped=False)]),
        ("tally_subscribers_update", "AFTER UPDATE OF left_all_reason, left_all_version ON subscribers",
         moved, [_add(audience, left_all_delta, slot, grouped=False), _add(audience, reclassified, slot)]),
        ("tally_subscribers_delete", f"{'BEFORE' if forget else 'AFTER'} DELETE ON subscribers", None,
         [*forget, _add(audience, _subscriber_deltas("OLD", "", -1), slot, grouped=False)]),
        ("tally_preferences_insert", "AFTER INSERT ON preferences", None,
         [_add(audience, new_prefs, slot, grouped=False)]),
        ("tally_preferences_update",
         "AFTER UPDATE OF subscriber_id, topic_id, subscribed, version ON preferences",
         None, [_add(audience, f"{old_prefs} UNION ALL {new_prefs}", slot)]),
        ("tally_preferences_delete", "AFTER DELETE ON preferences", None,
         [_add(audience, old_prefs, slot, grouped=False)]),
        ("tally_events_insert", "AFTER INSERT ON events", "NEW.action = 'unsubscribe'",
         [_add("opt_out_tallies", new_days, slot, grouped=False),
          _add("campaign_tallies", new_campaigns, slot, grouped=False)]),
        ("tally_events_update", "AFTER UPDATE OF action, topic_id, source, campaign, created_at ON events",
         "(OLD.action = 'unsubscribe' OR NEW.action = 'unsubscribe')",
         [_add("opt_out_tallies", f"{old_days} UNION ALL {new_days}", slot),
          _add("campaign_tallies", f"{old_campaigns} UNION ALL {new_campaigns}", slot)]),
        ("tally_events_delete", "AFTER DELETE ON events", "OLD.action = 'unsubscribe'",
         [_add("opt_out_tallies", old_days, slot, grouped=False),
          _add("campaign_tallies", old_campaigns, slot, grouped=False)]),
    ]  # fmt: skip


def _table_of(follows: str) -> str:
    return follows.rsplit(" ON ", 1)[1]


def _sqlite_statements() -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {name} {follows}{f' WHEN {when}' if when else ''}"
        f" BEGIN{''.join(f' {statement};' for statement in statements)} END"
        for name, follows, when, statements in _row_triggers("sqlite", "0")
    ]


# --- PostgreSQL: the row triggers for single changes, statement triggers for bulk writes ----

# A statement writing many rows (an import's batch, a check's new recipients) is counted
# once over its transition table when its transaction says so (``bulk``); any other is
# counted row by row, which costs a single change less. Either way each row is counted
# exactly once: the setting cannot change while a statement runs, and the row triggers'
# condition is the opposite of the statement triggers'. A bulk writer that does not say
# so is slower, never wrong.
BULK_SETTING = "prefs.tally_bulk"
_BULK = f"current_setting('{BULK_SETTING}', true) = 'on'"
_NOT_BULK = f"current_setting('{BULK_SETTING}', true) IS DISTINCT FROM 'on'"

_PG_SLOT = f"""
CREATE OR REPLACE FUNCTION prefs_tally_slot() RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
  -- the lowest shard no other open transaction holds (this one's own are free to it)
  FOR slot IN 1..{SLOTS} LOOP
    IF pg_try_advisory_xact_lock({LOCK_SPACE}, slot) THEN
      RETURN slot;
    END IF;
  END LOOP;
  -- every shard taken by a transaction still open: wait for one of them
  PERFORM pg_advisory_xact_lock({LOCK_SPACE}, 1 + mod(pg_backend_pid(), {SLOTS}));
  RETURN 1 + mod(pg_backend_pid(), {SLOTS});
END $$
"""


# the first shard, when free, without a function call: the common case, and the cheap one
_TAKE_SLOT = f"CASE WHEN pg_try_advisory_xact_lock({LOCK_SPACE}, 1) THEN 1 ELSE prefs_tally_slot() END"


def _pg_function(name: str, body: list[str]) -> str:
    """Return a trigger function whose statements write the shard in ``slot``."""
    joined = "".join(f"  {line}\n" for line in body)
    return (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"DECLARE slot integer;\nBEGIN\n{joined}  RETURN NULL;\nEND $$"
    )


def _pg_row_statements() -> list[str]:
    made = []
    for name, follows, when, statements in _row_triggers("postgresql", "slot"):
        # the shard is taken once a call: called from a statement's every row, a function
        # cost more than the statement's own work
        body = [f"slot := {_TAKE_SLOT};", *(f"{statement};" for statement in statements)]
        made += [
            _pg_function(f"prefs_{name}", body),
            f"DROP TRIGGER IF EXISTS {name} ON {_table_of(follows)}",
            f"CREATE TRIGGER {name} {follows} FOR EACH ROW"
            f" WHEN ({_NOT_BULK}{f' AND {when}' if when else ''}) EXECUTE FUNCTION prefs_{name}()",
        ]
    return made


# a bulk statement that wrote no row (an upsert's other half, say) takes no shard
_ANY_ROW = {
    "INSERT": "SELECT 1 FROM new_rows",
    "UPDATE": "SELECT 1 FROM new_rows",
    "DELETE": "SELECT 1 FROM old_rows",
}
_ANY_UNSUBSCRIBE = {
    "INSERT": "SELECT 1 FROM new_rows WHERE action = 'unsubscribe'",
    "UPDATE": "SELECT 1 FROM old_rows WHERE action = 'unsubscribe'"
    " UNION ALL SELECT 1 FROM new_rows WHERE action = 'unsubscribe'",
    "DELETE": "SELECT 1 FROM old_rows WHERE action = 'unsubscribe'",
}


def _pg_bulk_function(name: str, branches: dict[str, list[str]], guards: dict[str, str]) -> str:
    body = []
    for index, (operation, statements) in enumerate(branches.items()):
        body.append(f"{'IF' if index == 0 else 'ELSIF'} TG_OP = '{operation}' THEN")
        # (a separate IF: a condition is not evaluated left to right, and the other
        # operations' transition tables do not exist)
        body.append(f"  IF EXISTS ({guards[operation]}) THEN")
        body.append(f"    slot := {_TAKE_SLOT};")
        body.extend(f"    {statement};" for statement in statements)
        body.append("  END IF;")
    body.append("END IF;")
    return _pg_function(name, body)


def _pg_bulk_statements() -> list[str]:
    slot = "slot"
    audience = "audience_tallies"
    moved = (
        "o.left_all_reason IS DISTINCT FROM n.left_all_reason"
        " OR o.left_all_version IS DISTINCT FROM n.left_all_version"
    )
    pairs = " FROM old_rows o JOIN new_rows n ON n.id = o.id"
    left_all_delta = (
        "SELECT 0 AS topic_id, 'left_all' AS kind,"
        f" (n.left_all_reason IS NOT NULL)::int - (o.left_all_reason IS NOT NULL)::int AS n{pairs}"
    )
    reclassified = _reclassified(
        f"{pairs} JOIN preferences p ON p.subscriber_id = o.id",
        ("o.left_all_reason", "o.left_all_version"),
        ("n.left_all_reason", "n.left_all_version"),
        moved,
    )
    subscribers = _pg_bulk_function(
        "prefs_tally_subscribers",
        {
            "INSERT": [_add(audience, _subscriber_deltas("r", " FROM new_rows r", 1), slot)],
            "UPDATE": [_add(audience, f"{left_all_delta} UNION ALL {reclassified}", slot)],
            "DELETE": [_add(audience, _subscriber_deltas("r", " FROM old_rows r", -1), slot)],
        },
        {**_ANY_ROW, "UPDATE": f"SELECT 1{pairs} WHERE {moved}"},
    )
    with_subscriber = " FROM {rows} p JOIN subscribers s ON s.id = p.subscriber_id"
    new_prefs = _preference_deltas("p", with_subscriber.format(rows="new_rows"), 1)
    old_prefs = _preference_deltas("p", with_subscriber.format(rows="old_rows"), -1)
    preferences = _pg_bulk_function(
        "prefs_tally_preferences",
        {
            "INSERT": [_add(audience, new_prefs, slot)],
            "UPDATE": [_add(audience, f"{old_prefs} UNION ALL {new_prefs}", slot)],
            "DELETE": [_add(audience, old_prefs, slot)],
        },
        _ANY_ROW,
    )
    new_days, new_campaigns = _event_deltas("postgresql", "r", " FROM new_rows r", 1)
    old_days, old_campaigns = _event_deltas("postgresql", "r", " FROM old_rows r", -1)
    events = _pg_bulk_function(
        "prefs_tally_events",
        {
            "INSERT": [
                _add("opt_out_tallies", new_days, slot),
                _add("campaign_tallies", new_campaigns, slot),
            ],
            "UPDATE": [
                _add("opt_out_tallies", f"{old_days} UNION ALL {new_days}", slot),
                _add("campaign_tallies", f"{old_campaigns} UNION ALL {new_campaigns}", slot),
            ],
            "DELETE": [
                _add("opt_out_tallies", old_days, slot),
                _add("campaign_tallies", old_campaigns, slot),
            ],
        },
        _ANY_UNSUBSCRIBE,
    )
    forget = (
        "CREATE OR REPLACE FUNCTION prefs_forget_preferences() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n  DELETE FROM preferences WHERE subscriber_id = OLD.id;\n  RETURN OLD;\nEND $$"
    )
    triggers = [
        # a subscriber's preferences go first, while it is there to classify them
        "DROP TRIGGER IF EXISTS forget_preferences ON subscribers",
        "CREATE TRIGGER forget_preferences BEFORE DELETE ON subscribers"
        " FOR EACH ROW EXECUTE FUNCTION prefs_forget_preferences()",
    ]
    for table in ("subscribers", "preferences", "events"):
        for operation, transition in (
            ("insert", "REFERENCING NEW TABLE AS new_rows"),
            ("update", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"),
            ("delete", "REFERENCING OLD TABLE AS old_rows"),
        ):
            name = f"tally_{table}_{operation}_bulk"
            triggers += [
                f"DROP TRIGGER IF EXISTS {name} ON {table}",
                f"CREATE TRIGGER {name} AFTER {operation.upper()} ON {table} {transition}"
                f" FOR EACH STATEMENT WHEN ({_BULK}) EXECUTE FUNCTION prefs_tally_{table}()",
            ]
    return [subscribers, preferences, events, forget, *triggers]


def _pg_statements() -> list[str]:
    return [_PG_SLOT, *_pg_row_statements(), *_pg_bulk_statements()]


def bulk(session: Any) -> None:
    """Within a write transaction: count its statements as sets, not row by row (PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SELECT set_config('{BULK_SETTING}', 'on', true)"))


def statements(dialect: str) -> list[str]:
    """Return the statements that install (or replace) the triggers on ``dialect``."""
    return _pg_statements() if dialect == "postgresql" else _sqlite_statements()


def install(connection: Any) -> None:
    """Install the triggers that keep the tallies, replacing any there are."""
    for statement in statements(connection.dialect.name):
        connection.exec_driver_sql(statement)


def uninstall(connection: Any) -> None:
    """Remove the triggers and their functions (a downgrade)."""
    postgresql = connection.dialect.name == "postgresql"
    for name, follows, _, _ in _row_triggers(connection.dialect.name, "0"):
        table = _table_of(follows)
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
    days, campaigns = _event_deltas(dialect, "r", " FROM events r", 1)
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
        keys = ", ".join(_KEYS[table])
        # what the rows say, less what the counts say: the difference
        difference = f"{counted} UNION ALL SELECT {keys}, -n FROM {table}"  # noqa: S608
        connection.exec_driver_sql(_add(table, difference, "0"))
