"""Campaigns: how many recipients each was allowed, and its unsubscribe rate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, cast, func, select
from sqlalchemy.orm import Session

from .db import Statement, write_transaction
from .errors import UnknownTopic
from .ledger import UNSUBSCRIBE
from .models import CampaignSend, Event, Topic, utcnow
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

    The topic is found by its key inside the statement: every 10,000-recipient check
    counts, and an ORM lookup of the topic and an ORM upsert took 5 ms of it.
    """
    if not campaign or allowed_count <= 0 or topic_key == TRANSACTIONAL:
        return
    now = now or utcnow()
    params = {"campaign": campaign, "key": lookup_key(topic_key), "allowed": allowed_count, "now": now}
    with write_transaction(session, events=False):
        counted = _COUNT_SENT.first(session, params)
    if counted is None:
        raise UnknownTopic(f"there is no topic {topic_key!r}")


_COUNT_SENT = Statement(
    "INSERT INTO campaign_sends (campaign, topic_id, allowed, first_at, last_at)"
    " SELECT :campaign, id, :allowed, :now, :now FROM topics WHERE key = :key"
    " ON CONFLICT (campaign, topic_id) DO UPDATE"
    " SET allowed = campaign_sends.allowed + excluded.allowed, last_at = excluded.last_at"
    " RETURNING topic_id",
    now=CampaignSend.__table__.c.first_at.type,
)


def ranked(session: Session, since: datetime, limit: int = 50) -> list[CampaignRate]:
    """Return the campaigns sent since ``since``, highest unsubscribe rate first."""
    sends = (
        select(
            CampaignSend.campaign,
            func.sum(CampaignSend.allowed).label("allowed"),
            func.min(CampaignSend.first_at).label("first_at"),
            func.count().label("topic_count"),
            func.min(Topic.key).label("topic"),
        )
        .join(Topic, Topic.id == CampaignSend.topic_id)
        .group_by(CampaignSend.campaign)
        .having(func.max(CampaignSend.last_at) >= since)
        .subquery()
    )
    opt_outs = (
        select(Event.campaign, func.count().label("opt_outs"))
        .where(Event.action == UNSUBSCRIBE, Event.campaign.in_(select(sends.c.campaign)))
        .group_by(Event.campaign)
        .subquery()
    )
    count = func.coalesce(opt_outs.c.opt_outs, 0)
    rate = cast(count, Float) / sends.c.allowed
    rows = session.execute(
        select(sends, count.label("opt_outs"))
        .outerjoin(opt_outs, opt_outs.c.campaign == sends.c.campaign)
        .order_by(rate.desc(), sends.c.campaign)
        .limit(limit)
    )
    return [
        CampaignRate(
            campaign=row.campaign,
            topics=row.topic if row.topic_count == 1 else f"{row.topic} +{row.topic_count - 1}",
            allowed=int(row.allowed),
            opt_outs=int(row.opt_outs),
            first_at=row.first_at,
        )
        for row in rows
    ]
