"""The statements the hot paths run on the driver, by name: one-click, pages, events, the check.

Each is a ``Statement``: written once with ``:name`` parameters, prepared once per dialect.
Building SQLAlchemy constructs per request costs more than the database work they do.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Boolean

from ..models import UTCDateTime
from .driver import Statement

# the current transaction's id on PostgreSQL, which the change feed orders by
PG_TXID = "pg_current_xact_id()::text::bigint"

BUMP = Statement(
    "UPDATE subscribers SET version = version + 1 WHERE public_id = :public_id"
    # bounced_at itself: SQLite 3.40 answers "bounced_at IS NOT NULL" wrongly in a RETURNING
    " RETURNING id, version, left_all_version, left_all_reason, bounced_at"
)
TOPIC_ID = Statement("SELECT id, opt_in FROM topics WHERE key = :key")
# choosing an opt-out topic one receives by default changes nothing, unless a refusal is on file
BACK_TO_DEFAULT = Statement(
    "UPDATE preferences SET subscribed = :subscribed, version = :version, source = :source,"
    " updated_at = :now WHERE subscriber_id = :subscriber_id AND topic_id = :topic_id"
    " AND NOT subscribed RETURNING topic_id",
    now=UTCDateTime(),
    subscribed=Boolean(),
)
CHOOSE = Statement(
    "INSERT INTO preferences (subscriber_id, topic_id, subscribed, version, source, updated_at)"
    " VALUES (:subscriber_id, :topic_id, :subscribed, :version, :source, :now)"
    " ON CONFLICT (subscriber_id, topic_id) DO UPDATE SET subscribed = excluded.subscribed,"
    " version = excluded.version, source = excluded.source, updated_at = excluded.updated_at"
    # a choice made before leaving all marketing does not count: choosing it again is a change
    " WHERE preferences.subscribed != excluded.subscribed"
    " OR (excluded.subscribed AND preferences.version <= :left_all_version)"
    " RETURNING topic_id",
    now=UTCDateTime(),
    subscribed=Boolean(),
)


def leave_all(ranks: Mapping[str, int]) -> Statement:
    """Return the statement that takes a subscriber out of all marketing, ranking reasons by ``ranks``.

    A stronger reason replaces a weaker one, and a weaker one never replaces it (a reason not
    in ``ranks`` ranks 1); a topic chosen since leaving makes leaving again a change.
    """
    if not all(reason.isidentifier() and reason.islower() for reason in ranks):
        raise ValueError("a reason is a lower-case name")
    ranked = " ".join(f"WHEN '{reason}' THEN {int(rank)}" for reason, rank in sorted(ranks.items()))
    case = f"(CASE left_all_reason {ranked} ELSE 1 END)"
    # the ranks are the code's own names and integers, checked above
    return Statement(
        "UPDATE subscribers SET version = version + 1, left_all_version = version + 1,"  # noqa: S608
        f" left_all_reason = CASE WHEN left_all_reason IS NOT NULL AND {case} > :rank"
        " THEN left_all_reason ELSE :reason END, left_all_at = :now,"
        " bounced_at = CASE WHEN :bounced THEN :now ELSE bounced_at END"
        " WHERE public_id = :public_id AND (left_all_reason IS NULL"
        f" OR {case} < :rank"
        " OR EXISTS (SELECT 1 FROM preferences p WHERE p.subscriber_id = subscribers.id"
        " AND p.subscribed AND p.version > subscribers.left_all_version))"
        " RETURNING id",
        now=UTCDateTime(),
        bounced=Boolean(),
    )


BOUNCED = Statement(
    "UPDATE subscribers SET bounced_at = :now WHERE public_id = :public_id", now=UTCDateTime()
)
REJOIN_ALL = Statement(
    "UPDATE subscribers SET left_all_reason = NULL, left_all_at = NULL, left_all_version = NULL,"
    " bounced_at = CASE WHEN :bounce THEN NULL ELSE bounced_at END WHERE id = :subscriber_id",
    bounce=Boolean(),
)
LIFT_BOUNCE = Statement("UPDATE subscribers SET bounced_at = NULL WHERE id = :subscriber_id")
EVENT = (
    "INSERT INTO events (txid, subscriber_id, topic_id, action, reason, source, campaign, fingerprint,"
    " created_at) VALUES ({txid}, :subscriber_id, :topic_id, :action, :reason, :source, :campaign,"
    " :fingerprint, :at) RETURNING id"
)
EVENTS = {
    dialect: Statement(EVENT.format(txid=txid), at=UTCDateTime())
    for dialect, txid in (("postgresql", PG_TXID), ("sqlite", "0"))
}

COUNT_SENT = Statement(
    "INSERT INTO campaign_sends (campaign, topic_id, allowed, first_at, last_at)"
    " SELECT :campaign, id, :allowed, :now, :now FROM topics WHERE key = :key"
    " ON CONFLICT (campaign, topic_id) DO UPDATE"
    " SET allowed = campaign_sends.allowed + excluded.allowed, last_at = excluded.last_at"
    " RETURNING topic_id",
    now=UTCDateTime(),
)
