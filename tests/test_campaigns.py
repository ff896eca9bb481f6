"""Counting a campaign's allowed recipients, and ranking campaigns by unsubscribe rate."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from prefs import campaigns, ledger
from prefs.errors import UnknownTopic
from prefs.ledger import Origin
from prefs.models import CampaignSend, utcnow
from tests.factories import make_subscriber, make_topic


def test_count_sent_adds_up_in_one_row(session):
    make_topic(session, "news")
    campaigns.count_sent(session, "spring", "news", 100)
    campaigns.count_sent(session, "spring", "news", 50)
    rows = session.scalars(select(CampaignSend)).all()
    assert [(r.campaign, r.allowed) for r in rows] == [("spring", 150)]


def test_nothing_is_counted_without_a_campaign_for_transactional_or_for_zero(session):
    make_topic(session, "news")
    campaigns.count_sent(session, None, "news", 10)
    campaigns.count_sent(session, "receipts", "transactional", 10)
    campaigns.count_sent(session, "spring", "news", 0)
    assert session.scalars(select(CampaignSend)).all() == []
    with pytest.raises(UnknownTopic):
        campaigns.count_sent(session, "spring", "nope", 10)


def test_campaigns_rank_by_opt_outs_over_allowed_recipients(session):
    make_topic(session, "news")
    make_topic(session, "promotions")
    campaigns.count_sent(session, "calm", "news", 1000)
    campaigns.count_sent(session, "loud", "promotions", 100)
    campaigns.count_sent(session, "quiet", "news", 10)
    for i in range(5):
        person = make_subscriber(session, f"p{i}@example.com")
        ledger.record_opt_out(session, person.public_id, "promotions", Origin("one-click", campaign="loud"))
        if i < 2:
            ledger.record_opt_out(session, person.public_id, None, Origin("page", campaign="calm"))
    ranked = campaigns.ranked(session, utcnow() - timedelta(days=90))
    assert [(c.campaign, c.opt_outs, c.allowed) for c in ranked] == [
        ("loud", 5, 100),
        ("calm", 2, 1000),
        ("quiet", 0, 10),
    ]
    assert ranked[0].rate == pytest.approx(0.05)
    assert ranked[0].topics == "promotions"
    assert campaigns.ranked(session, utcnow() + timedelta(days=1)) == []
