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
time: its shard is always 0, as is the one ``rebuild`` writes.

A later change to a trigger or function needs a migration of its own that runs
``install`` again (it replaces what is there).
"""

from __future__ import annotations

from typing import Any

# advisory lock space of the shards ("pref"), and how many shards a count may have
LOCK_SPACE = 1886545254
SLOTS = 64
KINDS = ("stayed_on", "stayed_off", "again_on", "left_on", "left_off")


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


def _add(table: str, deltas: str, shard: str) -> str:
    """Return the statement that adds the rows of ``deltas`` (its keys and ``n``) to ``table``."""
    keys = ", ".join(_KEYS[table])
    # every part is this module's own constant SQL, never a value. "WHERE true": SQLite's
    # parser needs a WHERE before ON CONFLICT in INSERT ... SELECT
    return (
        f"INSERT INTO {table} ({keys}, shard, n) SELECT {keys}, {shard}, sum(n) FROM ({deltas}) AS d"  # noqa: S608
        f" WHERE true GROUP BY {keys} HAVING sum(n) <> 0"
        f" ON CONFLICT ({keys}, shard) DO UPDATE SET n = {table}.n + excluded.n"
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


# --- PostgreSQL: statement triggers over transition tables, set-based for bulk writes ------

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


def _pg_function(name: str, branches: dict[str, list[str]]) -> str:
    body = []
    for index, (operation, statements) in enumerate(branches.items()):
        keyword = "IF" if index == 0 else "ELSIF"
        body.append(f"  {keyword} TG_OP = '{operation}' THEN")
        body.extend(f"    {statement};" for statement in statements)
    body.append("  END IF;")
    joined = "\n".join(body)
    return (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n{joined}\n  RETURN NULL;\nEND $$"
    )


def _pg_statements() -> list[str]:
    slot = "prefs_tally_slot()"
    audience = "audience_tallies"
    changed = " FROM old_rows o JOIN new_rows n ON n.id = o.id JOIN preferences p ON p.subscriber_id = o.id"
    moved = (
        "o.left_all_reason IS DISTINCT FROM n.left_all_reason"
        " OR o.left_all_version IS DISTINCT FROM n.left_all_version"
    )
    left_all_delta = (
        "SELECT 0 AS topic_id, 'left_all' AS kind,"
        " (n.left_all_reason IS NOT NULL)::int - (o.left_all_reason IS NOT NULL)::int AS n"
        " FROM old_rows o JOIN new_rows n ON n.id = o.id"
    )
    subscribers = _pg_function(
        "prefs_tally_subscribers",
        {
            "INSERT": [_add(audience, _subscriber_deltas("r", " FROM new_rows r", 1), slot)],
            "UPDATE": [
                _add(
                    audience,
                    left_all_delta
                    + " UNION ALL "
                    + _reclassified(
                        changed,
                        ("o.left_all_reason", "o.left_all_version"),
                        ("n.left_all_reason", "n.left_all_version"),
                        moved,
                    ),
                    slot,
                )
            ],
            "DELETE": [_add(audience, _subscriber_deltas("r", " FROM old_rows r", -1), slot)],
        },
    )
    with_subscriber = " FROM {rows} p JOIN subscribers s ON s.id = p.subscriber_id"
    preferences = _pg_function(
        "prefs_tally_preferences",
        {
            "INSERT": [
                _add(audience, _preference_deltas("p", with_subscriber.format(rows="new_rows"), 1), slot)
            ],
            "UPDATE": [
                _add(
                    audience,
                    _preference_deltas("p", with_subscriber.format(rows="old_rows"), -1)
                    + " UNION ALL "
                    + _preference_deltas("p", with_subscriber.format(rows="new_rows"), 1),
                    slot,
                )
            ],
            "DELETE": [
                _add(audience, _preference_deltas("p", with_subscriber.format(rows="old_rows"), -1), slot)
            ],
        },
    )
    new_days, new_campaigns = _event_deltas("postgresql", "r", " FROM new_rows r", 1)
    old_days, old_campaigns = _event_deltas("postgresql", "r", " FROM old_rows r", -1)
    events = _pg_function(
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
    )
    # a subscriber's preferences go first, while the subscriber is still there to classify
    # them (a foreign key's cascade would delete them after it)
    forget = (
        "CREATE OR REPLACE FUNCTION prefs_forget_preferences() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        "BEGIN\n  DELETE FROM preferences WHERE subscriber_id = OLD.id;\n  RETURN OLD;\nEND $$"
    )
    triggers = []
    for table, function in (
        ("subscribers", "prefs_tally_subscribers"),
        ("preferences", "prefs_tally_preferences"),
        ("events", "prefs_tally_events"),
    ):
        for operation, transition in (
            ("insert", "REFERENCING NEW TABLE AS new_rows"),
            ("update", "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"),
            ("delete", "REFERENCING OLD TABLE AS old_rows"),
        ):
            name = f"tally_{table}_{operation}"
            triggers += [
                f"DROP TRIGGER IF EXISTS {name} ON {table}",
                f"CREATE TRIGGER {name} AFTER {operation.upper()} ON {table} {transition}"
                f" FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
            ]
    triggers += [
        "DROP TRIGGER IF EXISTS forget_preferences ON subscribers",
        "CREATE TRIGGER forget_preferences BEFORE DELETE ON subscribers"
        " FOR EACH ROW EXECUTE FUNCTION prefs_forget_preferences()",
    ]
    return [_PG_SLOT, subscribers, preferences, events, forget, *triggers]


# --- SQLite: row triggers ------------------------------------------------------------------


def _sqlite_trigger(name: str, when: str, statements: list[str]) -> str:
    body = "".join(f" {statement};" for statement in statements)
    return f"CREATE TRIGGER IF NOT EXISTS {name} {when} BEGIN{body} END"


def _sqlite_statements() -> list[str]:
    audience = "audience_tallies"
    of_subscriber = " FROM subscribers s WHERE s.id = {r}.subscriber_id"
    prefs_of = " FROM preferences p"
    moved = (
        "p.subscriber_id = NEW.id AND (OLD.left_all_reason IS NOT NEW.left_all_reason"
        " OR OLD.left_all_version IS NOT NEW.left_all_version)"
    )
    left_all_delta = (
        "SELECT 0 AS topic_id, 'left_all' AS kind,"
        " (NEW.left_all_reason IS NOT NULL) - (OLD.left_all_reason IS NOT NULL) AS n"
    )
    new_days, new_campaigns = _event_deltas("sqlite", "NEW", "", 1)
    old_days, old_campaigns = _event_deltas("sqlite", "OLD", "", -1)
    return [
        _sqlite_trigger(
            "tally_subscribers_insert",
            "AFTER INSERT ON subscribers",
            [_add(audience, _subscriber_deltas("NEW", "", 1), "0")],
        ),
        _sqlite_trigger(
            "tally_subscribers_update",
            "AFTER UPDATE OF left_all_reason, left_all_version ON subscribers"
            " WHEN OLD.left_all_reason IS NOT NEW.left_all_reason"
            " OR OLD.left_all_version IS NOT NEW.left_all_version",
            [
                _add(
                    audience,
                    left_all_delta
                    + " UNION ALL "
                    + _reclassified(
                        prefs_of,
                        ("OLD.left_all_reason", "OLD.left_all_version"),
                        ("NEW.left_all_reason", "NEW.left_all_version"),
                        moved,
                    ),
                    "0",
                )
            ],
        ),
        # the preferences go first, while the subscriber is there to classify them
        _sqlite_trigger(
            "tally_subscribers_delete",
            "BEFORE DELETE ON subscribers",
            [
                "DELETE FROM preferences WHERE subscriber_id = OLD.id",
                _add(audience, _subscriber_deltas("OLD", "", -1), "0"),
            ],
        ),
        _sqlite_trigger(
            "tally_preferences_insert",
            "AFTER INSERT ON preferences",
            [_add(audience, _preference_deltas("NEW", of_subscriber.format(r="NEW"), 1), "0")],
        ),
        _sqlite_trigger(
            "tally_preferences_update",
            "AFTER UPDATE OF subscriber_id, topic_id, subscribed, version ON preferences",
            [
                _add(
                    audience,
                    _preference_deltas("OLD", of_subscriber.format(r="OLD"), -1)
                    + " UNION ALL "
                    + _preference_deltas("NEW", of_subscriber.format(r="NEW"), 1),
                    "0",
                )
            ],
        ),
        _sqlite_trigger(
            "tally_preferences_delete",
            "AFTER DELETE ON preferences",
            [_add(audience, _preference_deltas("OLD", of_subscriber.format(r="OLD"), -1), "0")],
        ),
        _sqlite_trigger(
            "tally_events_insert",
            "AFTER INSERT ON events WHEN NEW.action = 'unsubscribe'",
            [_add("opt_out_tallies", new_days, "0"), _add("campaign_tallies", new_campaigns, "0")],
        ),
        _sqlite_trigger(
            "tally_events_update",
            "AFTER UPDATE OF action, topic_id, source, campaign, created_at ON events",
            [
                _add("opt_out_tallies", f"{old_days} UNION ALL {new_days}", "0"),
                _add("campaign_tallies", f"{old_campaigns} UNION ALL {new_campaigns}", "0"),
            ],
        ),
        _sqlite_trigger(
            "tally_events_delete",
            "AFTER DELETE ON events WHEN OLD.action = 'unsubscribe'",
            [_add("opt_out_tallies", old_days, "0"), _add("campaign_tallies", old_campaigns, "0")],
        ),
    ]


def statements(dialect: str) -> list[str]:
    """Return the statements that install (or replace) the triggers on ``dialect``."""
    return _pg_statements() if dialect == "postgresql" else _sqlite_statements()


def install(connection: Any) -> None:
    """Install the triggers that keep the tallies, replacing any there are."""
    for statement in statements(connection.dialect.name):
        connection.exec_driver_sql(statement)


def uninstall(connection: Any) -> None:
    """Remove the triggers and their functions (a downgrade)."""
    for table in ("subscribers", "preferences", "events"):
        for operation in ("insert", "update", "delete"):
            connection.exec_driver_sql(
                f"DROP TRIGGER IF EXISTS tally_{table}_{operation}"
                + (f" ON {table}" if connection.dialect.name == "postgresql" else "")
            )
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("DROP TRIGGER IF EXISTS forget_preferences ON subscribers")
        for function in _PG_FUNCTIONS:
            connection.exec_driver_sql(f"DROP FUNCTION IF EXISTS {function}()")


_PG_FUNCTIONS = (
    "prefs_tally_subscribers",
    "prefs_tally_preferences",
    "prefs_tally_events",
    "prefs_forget_preferences",
    "prefs_tally_slot",
)


def rebuild(connection: Any) -> None:
    """Count everything again from the tables, into shard 0; writers wait meanwhile.

    The migration that adds the tallies runs it once; an operator may run it after
    writing the tables with the triggers disabled (``session_replication_role``).
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql("LOCK TABLE subscribers, preferences, events IN SHARE MODE")
    for table in _KEYS:
        connection.exec_driver_sql(f"DELETE FROM {table}")  # noqa: S608
    kind = preference_class("s.left_all_reason", "s.left_all_version", "p.subscribed", "p.version")
    everything = (
        "SELECT 0 AS topic_id, 'everyone' AS kind, 1 AS n FROM subscribers"  # noqa: S608
        " UNION ALL SELECT 0, 'left_all', 1 FROM subscribers WHERE left_all_reason IS NOT NULL"
        f" UNION ALL SELECT p.topic_id, {kind}, 1 FROM preferences p"
        " JOIN subscribers s ON s.id = p.subscriber_id"
    )
    for statement in (
        _add(
            "audience_tallies",
            everything,
            "0",
        ),
        _add("opt_out_tallies", _event_deltas(dialect, "r", " FROM events r", 1)[0], "0"),
        _add("campaign_tallies", _event_deltas(dialect, "r", " FROM events r", 1)[1], "0"),
    ):
        connection.exec_driver_sql(statement)
