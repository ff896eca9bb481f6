"""PostgreSQL's counting: sharded counts under advisory locks, and a bulk statement counted as a set."""

from __future__ import annotations

from .triggers import (
    LOCK_SPACE,
    SLOTS,
    add,
    event_deltas,
    preference_deltas,
    reclassify,
    row_triggers,
    subscriber_deltas,
    table_of,
)

# A statement writing many rows (an import's batch, a check's new recipients) is counted
# once over its transition table when its transaction says so (``bulk``); any other is
# counted row by row, which costs a single change less. Either way each row is counted
# exactly once: the setting cannot change while a statement runs, and the row triggers'
# condition is the opposite of the statement triggers'. A bulk writer that does not say
# so is slower, never wrong.
BULK_SETTING = "prefs.tally_bulk"


BULK = f"current_setting('{BULK_SETTING}', true) = 'on'"


NOT_BULK = f"current_setting('{BULK_SETTING}', true) IS DISTINCT FROM 'on'"


PG_SLOT = f"""
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
TAKE_SLOT = f"CASE WHEN pg_try_advisory_xact_lock({LOCK_SPACE}, 1) THEN 1 ELSE prefs_tally_slot() END"


def pg_function(name: str, body: list[str]) -> str:
    """Return a trigger function whose statements write the shard in ``slot``."""
    joined = "".join(f"  {line}\n" for line in body)
    return (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"DECLARE slot integer;\nBEGIN\n{joined}  RETURN NULL;\nEND $$"
    )


def pg_row_statements() -> list[str]:
    made = []
    for name, follows, when, statements in row_triggers("postgresql", "slot"):
        # the shard is taken once a call: called from a statement's every row, a function
        # cost more than the statement's own work
        body = [f"slot := {TAKE_SLOT};", *(f"{statement};" for statement in statements)]
        made += [
            pg_function(f"prefs_{name}", body),
            f"DROP TRIGGER IF EXISTS {name} ON {table_of(follows)}",
            f"CREATE TRIGGER {name} {follows} FOR EACH ROW"
            f" WHEN ({NOT_BULK}{f' AND {when}' if when else ''}) EXECUTE FUNCTION prefs_{name}()",
        ]
    return made


# a bulk statement that wrote no row (an upsert's other half, say) takes no shard
ANY_ROW = {
    "INSERT": "SELECT 1 FROM new_rows",
    "UPDATE": "SELECT 1 FROM new_rows",
    "DELETE": "SELECT 1 FROM old_rows",
}


ANY_UNSUBSCRIBE = {
    "INSERT": "SELECT 1 FROM new_rows WHERE action = 'unsubscribe'",
    "UPDATE": "SELECT 1 FROM old_rows WHERE action = 'unsubscribe'"
    " UNION ALL SELECT 1 FROM new_rows WHERE action = 'unsubscribe'",
    "DELETE": "SELECT 1 FROM old_rows WHERE action = 'unsubscribe'",
}


def pg_bulk_function(name: str, branches: dict[str, list[str]], guards: dict[str, str]) -> str:
    body = []
    for index, (operation, statements) in enumerate(branches.items()):
        body.append(f"{'IF' if index == 0 else 'ELSIF'} TG_OP = '{operation}' THEN")
        # (a separate IF: a condition is not evaluated left to right, and the other
        # operations' transition tables do not exist)
        body.append(f"  IF EXISTS ({guards[operation]}) THEN")
        body.append(f"    slot := {TAKE_SLOT};")
        body.extend(f"    {statement};" for statement in statements)
        body.append("  END IF;")
    body.append("END IF;")
    return pg_function(name, body)


def pg_bulk_statements() -> list[str]:
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
    reclassified = reclassify(
        f"{pairs} JOIN preferences p ON p.subscriber_id = o.id",
        ("o.left_all_reason", "o.left_all_version"),
        ("n.left_all_reason", "n.left_all_version"),
        moved,
    )
    subscribers = pg_bulk_function(
        "prefs_tally_subscribers",
        {
            "INSERT": [add(audience, subscriber_deltas("r", " FROM new_rows r", 1), slot)],
            "UPDATE": [add(audience, f"{left_all_delta} UNION ALL {reclassified}", slot)],
            "DELETE": [add(audience, subscriber_deltas("r", " FROM old_rows r", -1), slot)],
        },
        {**ANY_ROW, "UPDATE": f"SELECT 1{pairs} WHERE {moved}"},
    )
    with_subscriber = " FROM {rows} p JOIN subscribers s ON s.id = p.subscriber_id"
    new_prefs = preference_deltas("p", with_subscriber.format(rows="new_rows"), 1)
    old_prefs = preference_deltas("p", with_subscriber.format(rows="old_rows"), -1)
    preferences = pg_bulk_function(
        "prefs_tally_preferences",
        {
            "INSERT": [add(audience, new_prefs, slot)],
            "UPDATE": [add(audience, f"{old_prefs} UNION ALL {new_prefs}", slot)],
            "DELETE": [add(audience, old_prefs, slot)],
        },
        ANY_ROW,
    )
    new_days, new_campaigns = event_deltas("postgresql", "r", " FROM new_rows r", 1)
    old_days, old_campaigns = event_deltas("postgresql", "r", " FROM old_rows r", -1)
    events = pg_bulk_function(
        "prefs_tally_events",
        {
            "INSERT": [
                add("opt_out_tallies", new_days, slot),
                add("campaign_tallies", new_campaigns, slot),
            ],
            "UPDATE": [
                add("opt_out_tallies", f"{old_days} UNION ALL {new_days}", slot),
                add("campaign_tallies", f"{old_campaigns} UNION ALL {new_campaigns}", slot),
            ],
            "DELETE": [
                add("opt_out_tallies", old_days, slot),
                add("campaign_tallies", old_campaigns, slot),
            ],
        },
        ANY_UNSUBSCRIBE,
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
                f" FOR EACH STATEMENT WHEN ({BULK}) EXECUTE FUNCTION prefs_tally_{table}()",
            ]
    return [subscribers, preferences, events, forget, *triggers]


def pg_statements() -> list[str]:
    return [PG_SLOT, *pg_row_statements(), *pg_bulk_statements()]
