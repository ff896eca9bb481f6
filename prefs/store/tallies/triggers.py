"""The counts' SQL on both databases: what each row change adds to which count, and SQLite's triggers."""

from __future__ import annotations

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


KEYS = {
    "audience_tallies": ("topic_id", "kind"),
    "opt_out_tallies": ("day", "topic_id", "source"),
    "campaign_tallies": ("campaign",),
}


def add(table: str, deltas: str, shard: str, grouped: bool = True) -> str:
    """Return the statement that adds the rows of ``deltas`` (its keys and ``n``) to ``table``.

    ``grouped``: the rows may name one count twice (a row's old and new values), so they
    are added up first; a single row's own deltas each name another count and need not be.
    """
    keys = ", ".join(KEYS[table])
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


def subscriber_deltas(r: str, source: str, sign: int) -> str:
    return (
        f"SELECT 0 AS topic_id, 'everyone' AS kind, {sign} AS n{source}"
        f" UNION ALL SELECT 0, 'left_all', {sign}{source} WHERE {r}.left_all_reason IS NOT NULL"
    )


def preference_deltas(p: str, source: str, sign: int) -> str:
    kind = preference_class("s.left_all_reason", "s.left_all_version", f"{p}.subscribed", f"{p}.version")
    return f"SELECT {p}.topic_id AS topic_id, {kind} AS kind, {sign} AS n{source}"


def reclassify(prefs_of: str, old: tuple[str, str], new: tuple[str, str], where: str) -> str:
    """Return the deltas of a subscriber's preferences when its leaving-all columns change."""
    before = preference_class(*old, "p.subscribed", "p.version")
    after = preference_class(*new, "p.subscribed", "p.version")
    return (
        f"SELECT p.topic_id AS topic_id, {before} AS kind, -1 AS n{prefs_of} WHERE {where}"
        f" UNION ALL SELECT p.topic_id, {after}, 1{prefs_of} WHERE {where}"
    )


def event_deltas(dialect: str, r: str, source: str, sign: int) -> tuple[str, str]:
    where = f" WHERE {r}.action = 'unsubscribe'"
    days = (
        f"SELECT {utc_day(dialect, f'{r}.created_at')} AS day, COALESCE({r}.topic_id, 0) AS topic_id,"
        f" {r}.source AS source, {sign} AS n{source}{where}"
    )
    campaigns = f"SELECT {r}.campaign AS campaign, {sign} AS n{source}{where} AND {r}.campaign IS NOT NULL"
    return days, campaigns


# --- the row triggers, on both databases ----------------------------------------------------


def distinct(dialect: str, a: str, b: str) -> str:
    return f"{a} IS DISTINCT FROM {b}" if dialect == "postgresql" else f"{a} IS NOT {b}"


def row_triggers(dialect: str, slot: str) -> list[tuple[str, str, str | None, list[str]]]:
    """Return each row trigger: its name, what it follows, its condition, its statements."""
    audience = "audience_tallies"
    of_subscriber = " FROM subscribers s WHERE s.id = {r}.subscriber_id"
    left_all_delta = (
        "SELECT 0 AS topic_id, 'left_all' AS kind, CAST(NEW.left_all_reason IS NOT NULL AS integer)"
        " - CAST(OLD.left_all_reason IS NOT NULL AS integer) AS n"
        " WHERE (NEW.left_all_reason IS NULL) <> (OLD.left_all_reason IS NULL)"
    )
    reclassified = reclassify(
        " FROM preferences p",
        ("OLD.left_all_reason", "OLD.left_all_version"),
        ("NEW.left_all_reason", "NEW.left_all_version"),
        "p.subscriber_id = NEW.id",
    )
    moved = (
        f"({distinct(dialect, 'OLD.left_all_reason', 'NEW.left_all_reason')}"
        f" OR {distinct(dialect, 'OLD.left_all_version', 'NEW.left_all_version')})"
    )
    new_prefs = preference_deltas("NEW", of_subscriber.format(r="NEW"), 1)
    old_prefs = preference_deltas("OLD", of_subscriber.format(r="OLD"), -1)
    new_days, new_campaigns = event_deltas(dialect, "NEW", "", 1)
    old_days, old_campaigns = event_deltas(dialect, "OLD", "", -1)
    # a subscriber's preferences go first, while it is there to classify them (a foreign
    # key's cascade would delete them after it); PostgreSQL does so in a trigger of its own
    forget = ["DELETE FROM preferences WHERE subscriber_id = OLD.id"] if dialect == "sqlite" else []
    return [
        ("tally_subscribers_insert", "AFTER INSERT ON subscribers", None,
         [add(audience, subscriber_deltas("NEW", "", 1), slot, grouped=False)]),
        ("tally_subscribers_update", "AFTER UPDATE OF left_all_reason, left_all_version ON subscribers",
         moved, [add(audience, left_all_delta, slot, grouped=False), add(audience, reclassified, slot)]),
        ("tally_subscribers_delete", f"{'BEFORE' if forget else 'AFTER'} DELETE ON subscribers", None,
         [*forget, add(audience, subscriber_deltas("OLD", "", -1), slot, grouped=False)]),
        ("tally_preferences_insert", "AFTER INSERT ON preferences", None,
         [add(audience, new_prefs, slot, grouped=False)]),
        ("tally_preferences_update",
         "AFTER UPDATE OF subscriber_id, topic_id, subscribed, version ON preferences",
         None, [add(audience, f"{old_prefs} UNION ALL {new_prefs}", slot)]),
        ("tally_preferences_delete", "AFTER DELETE ON preferences", None,
         [add(audience, old_prefs, slot, grouped=False)]),
        ("tally_events_insert", "AFTER INSERT ON events", "NEW.action = 'unsubscribe'",
         [add("opt_out_tallies", new_days, slot, grouped=False),
          add("campaign_tallies", new_campaigns, slot, grouped=False)]),
        ("tally_events_update", "AFTER UPDATE OF action, topic_id, source, campaign, created_at ON events",
         "(OLD.action = 'unsubscribe' OR NEW.action = 'unsubscribe')",
         [add("opt_out_tallies", f"{old_days} UNION ALL {new_days}", slot),
          add("campaign_tallies", f"{old_campaigns} UNION ALL {new_campaigns}", slot)]),
        ("tally_events_delete", "AFTER DELETE ON events", "OLD.action = 'unsubscribe'",
         [add("opt_out_tallies", old_days, slot, grouped=False),
          add("campaign_tallies", old_campaigns, slot, grouped=False)]),
    ]  # fmt: skip


def table_of(follows: str) -> str:
    return follows.rsplit(" ON ", 1)[1]


def sqlite_statements() -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {name} {follows}{f' WHEN {when}' if when else ''}"
        f" BEGIN{''.join(f' {statement};' for statement in statements)} END"
        for name, follows, when, statements in row_triggers("sqlite", "0")
    ]


# --- PostgreSQL: the row triggers for single changes, statement triggers for bulk writes ----
