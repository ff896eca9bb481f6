"""Campaigns: how many recipients each was allowed, and its unsubscribe rate, a page at a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from ..errors import UnknownTopic
from ..models import CampaignSend, CampaignTally, Topic, utcnow
from ..store import queries, write_transaction
from . import cursors
from .rules import TRANSACTIONAL
from .topics import lookup_key


@dataclass(frozen=True, slots=True)
class CampaignRate:
    """A campaign's allowed recipients, the opt-outs its links brought, and their ratio."""

    campaign: str
    topics: str
    allowed: int
    opt_outs: int
    first_at: datetime

    @property
    def rate(self) -> float:
        return self.opt_outs / self.allowed if self.allowed else 0.0


def count_sent(
    session: Session, campaign: str | None, topic_key: str, allowed_count: int, now: datetime | None = None
) -> None:
    """Add the recipients a check allowed for a campaign and topic, in one upsert statement.

    The topic is found by its key inside the statement: every check counts, and an ORM
    lookup and upsert would cost a large check more than the database work.
    """
    if not campaign or allowed_count <= 0 or topic_key == TRANSACTIONAL:
        return
    now = now or utcnow()
    params = {"campaign": campaign, "key": lookup_key(topic_key), "allowed": allowed_count, "now": now}
    with write_transaction(session, events=False):
        counted = queries.COUNT_SENT.first(session, params)
    if counted is None:
        raise UnknownTopic(f"there is no topic {topic_key!r}")


@dataclass(frozen=True, slots=True)
class CampaignPage:
    """Campaigns, newest first, and the cursor of the next page (None on the last)."""

    items: list[CampaignRate]
    next_cursor: str | None


def page(session: Session, cursor: str | None = None, limit: int = 50) -> CampaignPage:
    """Return a page of campaigns, newest first (by first check), with their unsubscribe rates.

    A page reads its own campaigns' rows and counts only, by index: whatever the number of
    campaigns and events, a page costs the same.
    """
    other = aliased(CampaignSend)
    # one row a campaign, its first (campaign, topic) row: the others of a campaign are skipped
    query = select(CampaignSend.campaign, CampaignSend.first_at).where(
        ~exists().where(
            other.campaign == CampaignSend.campaign,
            or_(
                other.first_at < CampaignSend.first_at,
                and_(other.first_at == CampaignSend.first_at, other.topic_id < CampaignSend.topic_id),
            ),
        )
    )
    if cursor:
        at, name = cursors.decode(cursor, datetime, str)
        query = query.where(
            or_(CampaignSend.first_at < at, and_(CampaignSend.first_at == at, CampaignSend.campaign < name))
        )
    rows = session.execute(
        query.order_by(CampaignSend.first_at.desc(), CampaignSend.campaign.desc()).limit(limit + 1)
    ).all()
    names = [row.campaign for row in rows[:limit]]
    sends = {
        row.campaign: row
        for row in session.execute(
            select(
                CampaignSend.campaign,
                func.sum(CampaignSend.allowed).label("allowed"),
                func.min(CampaignSend.first_at).label("first_at"),
                func.count().label("topic_count"),
                func.min(Topic.key).label("topic"),
            )
            .join(Topic, Topic.id == CampaignSend.topic_id)
            .where(CampaignSend.campaign.in_(names))
            .group_by(CampaignSend.campaign)
        )
    }
    opt_outs = dict(
        session.execute(
            select(CampaignTally.campaign, func.sum(CampaignTally.n))
            .where(CampaignTally.campaign.in_(names))
            .group_by(CampaignTally.campaign)
        ).all()
    )
    items = [
        CampaignRate(
            campaign=name,
            topics=(s.topic if s.topic_count == 1 else f"{s.topic} +{s.topic_count - 1}"),
            allowed=int(s.allowed),
            opt_outs=int(opt_outs.get(name) or 0),
            first_at=s.first_at,
        )
        for name, s in ((name, sends[name]) for name in names)
    ]
    last = rows[limit - 1] if len(rows) > limit else None
    return CampaignPage(items, None if last is None else cursors.encode(last.first_at, last.campaign))
