"""The operator's figures, each one set-based query: opt-outs per day, sources, audiences."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, and_, case, cast, func, select
from sqlalchemy.orm import Session

from .ledger import UNSUBSCRIBE
from .models import Event, Preference, Subscriber, Topic, utcnow

ALL_MARKETING = "All marketing"


@dataclass(frozen=True, slots=True)
class Audience:
    """How many subscribers a topic reaches now, and how many chose it or left it explicitly."""

    key: str
    name: str
    opt_in: bool
    archived: bool
    receiving: int
    chose: int
    left: int


def _day(session: Session, column: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)


def days(now: datetime, count: int) -> list[date]:
    """Return the last ``count`` days up to today (UTC), oldest first."""
    today = now.date()
    return [today - timedelta(days=count - 1 - i) for i in range(count)]


def opt_outs_per_day(
    session: Session, count: int = 90, now: datetime | None = None
) -> tuple[list[date], dict[str, list[int]]]:
    """Return the days, and for each topic (and all marketing) its opt-outs on each day."""
    now = now or utcnow()
    span = days(now, count)
    start = datetime.combine(span[0], datetime.min.time(), tzinfo=now.tzinfo)
    day = _day(session, Event.created_at).label("day")
    rows = session.execute(
        select(day, func.coalesce(Topic.name, ALL_MARKETING), func.count())
        .select_from(Event)
        .outerjoin(Topic, Topic.id == Event.topic_id)
        .where(Event.action == UNSUBSCRIBE, Event.created_at >= start)
        .group_by(day, Topic.name)
    )
    index = {d: i for i, d in enumerate(span)}
    series: dict[str, list[int]] = {}
    for value, name, number in rows:
        when = value if isinstance(value, date) else date.fromisoformat(str(value))
        if when in index:
            series.setdefault(name, [0] * count)[index[when]] += number
    return span, dict(sorted(series.items(), key=lambda item: (item[0] != ALL_MARKETING, item[0])))


def opt_outs_by_source(session: Session, count: int = 90, now: datetime | None = None) -> dict[str, int]:
    """Return the opt-outs of the last ``count`` days per source, largest first."""
    start = (now or utcnow()) - timedelta(days=count)
    rows = session.execute(
        select(Event.source, func.count())
        .where(Event.action == UNSUBSCRIBE, Event.created_at >= start)
        .group_by(Event.source)
        .order_by(func.count().desc(), Event.source)
    )
    return {source: number for source, number in rows}


def audiences(session: Session) -> list[Audience]:
    """Return every topic with the number of subscribers it reaches now.

    Mirrors ``rules.verdict`` over sets (a test checks the two agree): someone who
    left all marketing counts only for topics chosen again since; otherwise the
    explicit choice counts, and without one the topic's default.
    """
    everyone, left_all = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((Subscriber.left_all_reason.is_not(None), 1), else_=0)), 0),
        )
    ).one()
    stayed = Subscriber.left_all_reason.is_(None)
    chose_again = and_(
        Subscriber.left_all_reason.is_not(None),
        Preference.version > func.coalesce(Subscriber.left_all_version, 0),
    )
    rows = session.execute(
        select(
            Preference.topic_id,
            func.sum(case((and_(stayed, Preference.subscribed), 1), else_=0)),
            func.sum(case((stayed, 1), else_=0)),
            func.sum(case((and_(chose_again, Preference.subscribed), 1), else_=0)),
            func.sum(case((Preference.subscribed, 1), else_=0)),
            func.sum(case((Preference.subscribed, 0), else_=1)),
        )
        .join(Subscriber, Subscriber.id == Preference.subscriber_id)
        .group_by(Preference.topic_id)
    )
    counts = {row[0]: [int(n or 0) for n in row[1:]] for row in rows}
    result = []
    for topic in session.scalars(select(Topic).order_by(Topic.id)):
        on_stayed, with_choice_stayed, on_again, chose, left = counts.get(topic.id, [0, 0, 0, 0, 0])
        without_choice = int(everyone) - int(left_all) - with_choice_stayed
        receiving = on_stayed + on_again + (0 if topic.opt_in else without_choice)
        result.append(Audience(topic.key, topic.name, topic.opt_in, topic.archived, receiving, chose, left))
    return result
