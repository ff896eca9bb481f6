"""The operator's figures, read from the running counts (``prefs.tallies``): a few small reads.

Opt-outs per day and per source, and each topic's audience, whatever the size of the
tables: the counts are kept as the rows change, so nothing here aggregates a whole table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..models import AudienceTally, OptOutTally, Topic, utcnow
from . import cursors

ALL_MARKETING = "All marketing"


@dataclass(frozen=True, slots=True)
class Audience:
    """How many subscribers a topic reaches now, and how many chose it or left it explicitly."""

    id: int
    key: str
    name: str
    opt_in: bool
    archived: bool
    receiving: int
    chose: int
    left: int


def days(now: datetime, count: int) -> list[date]:
    """Return the last ``count`` days up to today (UTC), oldest first."""
    today = now.date()
    return [today - timedelta(days=count - 1 - i) for i in range(count)]


def _as_date(value: date | str) -> date:
    # SQLite hands a DATE back as text when it comes out of an aggregate
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def opt_outs_per_day(
    session: Session, count: int = 90, now: datetime | None = None
) -> tuple[list[date], dict[str, list[int]]]:
    """Return the days, and for each topic (and all marketing) its opt-outs on each day."""
    span = days(now or utcnow(), count)
    rows = session.execute(
        select(OptOutTally.day, OptOutTally.topic_id, func.sum(OptOutTally.n))
        .where(OptOutTally.day >= span[0])
        .group_by(OptOutTally.day, OptOutTally.topic_id)
    ).all()
    ids = {topic_id for _, topic_id, _ in rows if topic_id}
    names = dict(session.execute(select(Topic.id, Topic.name).where(Topic.id.in_(ids))).all())
    index = {d: i for i, d in enumerate(span)}
    series: dict[str, list[int]] = {}
    for day, topic_id, number in rows:
        when = _as_date(day)
        if when in index and number:
            name = names.get(topic_id, ALL_MARKETING) if topic_id else ALL_MARKETING
            series.setdefault(name, [0] * count)[index[when]] += int(number)
    return span, dict(sorted(series.items(), key=lambda item: (item[0] != ALL_MARKETING, item[0])))


def opt_outs_by_source(session: Session, count: int = 90, now: datetime | None = None) -> dict[str, int]:
    """Return the opt-outs of the last ``count`` days per source, largest first."""
    first = days(now or utcnow(), count)[0]
    total = func.sum(OptOutTally.n)
    rows = session.execute(
        select(OptOutTally.source, total)
        .where(OptOutTally.day >= first)
        .group_by(OptOutTally.source)
        .having(total != 0)
        .order_by(total.desc(), OptOutTally.source)
    )
    return {source: int(number) for source, number in rows}


@dataclass(frozen=True, slots=True)
class AudiencePage:
    """Topics in the order they were created, and the cursor of the next page (None on the last)."""

    items: list[Audience]
    next_cursor: str | None


def audience_page(session: Session, cursor: str | None = None, limit: int = 50) -> AudiencePage:
    """Return a page of topics with their audiences."""
    after = cursors.decode(cursor, int)[0] if cursor else 0
    items = audiences(session, after, limit + 1)
    if len(items) <= limit:
        return AudiencePage(items, None)
    return AudiencePage(items[:limit], cursors.encode(items[limit - 1].id))


def audiences(session: Session, after: int = 0, limit: int | None = None) -> list[Audience]:
    """Return the topics after id ``after`` (at most ``limit``), each with the subscribers it reaches now.

    Mirrors ``rules.verdict`` over the counted classes (a test checks the two agree):
    someone who left all marketing counts only for topics chosen again since
    (``again_on``); otherwise the explicit choice counts, and without one the topic's default.
    """
    query = select(Topic).where(Topic.id > after).order_by(Topic.id)
    topics = list(session.scalars(query if limit is None else query.limit(limit)))
    if not topics:
        return []
    counts: dict[tuple[int, str], int] = defaultdict(int)
    for topic_id, kind, number in session.execute(
        select(AudienceTally.topic_id, AudienceTally.kind, func.sum(AudienceTally.n))
        .where(AudienceTally.topic_id.in_([0, *(t.id for t in topics)]))
        .group_by(AudienceTally.topic_id, AudienceTally.kind)
    ):
        counts[topic_id, kind] = int(number)
    stayed = counts[0, "everyone"] - counts[0, "left_all"]
    result = []
    for topic in topics:
        on, off, again, before = (
            counts[topic.id, k] for k in ("stayed_on", "stayed_off", "again_on", "left_on")
        )
        without_choice = stayed - on - off
        receiving = on + again + (0 if topic.opt_in else without_choice)
        chose, left = on + again + before, off + counts[topic.id, "left_off"]
        result.append(
            Audience(topic.id, topic.key, topic.name, topic.opt_in, topic.archived, receiving, chose, left)
        )
    return result
