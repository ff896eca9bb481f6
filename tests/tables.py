"""Reading the tables whole: the running counts, a full recount, every stored value as text."""

from __future__ import annotations

from collections import defaultdict
from datetime import date

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from prefs.models import AudienceTally, Base, CampaignTally, OptOutTally
from prefs.store import tallies


def counts(session: Session) -> dict[tuple[object, ...], int]:
    """Return every running count, its shards added up, leaving out the zeros."""
    found: dict[tuple[object, ...], int] = defaultdict(int)
    for table, keys in (
        (AudienceTally, ("topic_id", "kind")),
        (OptOutTally, ("day", "topic_id", "source")),
        (CampaignTally, ("campaign",)),
    ):
        columns = [getattr(table, k) for k in keys]
        for *key, number in session.execute(select(*columns, func.sum(table.n)).group_by(*columns)):
            key = [date.fromisoformat(k) if isinstance(k, str) and k[:2] == "20" else k for k in key]
            if number:
                found[(table.__tablename__, *key)] += int(number)
    return dict(found)


def recounted(session: Session) -> dict[tuple[object, ...], int]:
    """Return the counts a full count of the tables makes (``recount``); the tallies stay as they were."""
    session.rollback()
    connection = session.connection()
    nested = connection.begin_nested()
    tallies.recount(connection)
    fresh = counts(session)
    nested.rollback()
    session.rollback()
    return fresh


def database_text(session):
    """Return every value of every table, as one text, to search for what must be gone."""
    parts = []
    for table in Base.metadata.sorted_tables:
        for row in session.execute(text(f'SELECT * FROM "{table.name}"')):
            parts.append(" ".join(str(v) for v in row))
    return "\n".join(parts)
