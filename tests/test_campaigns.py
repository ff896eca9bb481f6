"""Counting a campaign's allowed recipients, and ranking campaigns by unsubscribe rate."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from prefs.domain import campaigns, cursors, ledger
from prefs.domain.changes import Origin
from prefs.errors import InvalidValue, UnknownTopic
from prefs.models import CampaignSend, utcnow
from tests.factories import make_key, make_subscriber, make_topic


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


def test_campaigns_come_newest_first_with_opt_outs_over_allowed_recipients(session):
    make_topic(session, "news")
    make_topic(session, "promotions")
    now = utcnow()
    campaigns.count_sent(session, "calm", "news", 1000, now=now - timedelta(days=3))
    campaigns.count_sent(session, "loud", "promotions", 100, now=now - timedelta(days=2))
    campaigns.count_sent(session, "loud", "news", 100, now=now - timedelta(days=1))
    campaigns.count_sent(session, "quiet", "news", 10, now=now)
    for i in range(5):
        person = make_subscriber(session, f"p{i}@example.com")
        ledger.record_opt_out(session, person.public_id, "promotions", Origin("one-click", campaign="loud"))
        if i < 2:
            ledger.record_opt_out(session, person.public_id, None, Origin("page", campaign="calm"))
    page = campaigns.page(session)
    assert [(c.campaign, c.opt_outs, c.allowed) for c in page.items] == [
        ("quiet", 0, 10),
        ("loud", 5, 200),
        ("calm", 2, 1000),
    ]
    assert page.next_cursor is None
    assert page.items[1].rate == pytest.approx(0.025)
    assert page.items[1].topics == "news +1"
    assert page.items[1].first_at == now - timedelta(days=2)


def test_campaign_pages_hold_each_campaign_once_whatever_is_sent_meanwhile(session):
    make_topic(session, "news")
    make_topic(session, "promotions")
    now = utcnow()
    for i in range(23):
        # pairs checked at the same moment: the name breaks the tie
        campaigns.count_sent(session, f"c{i:02d}", "news", 10, now=now - timedelta(hours=i // 2))
        if i % 3 == 0:
            campaigns.count_sent(session, f"c{i:02d}", "promotions", 5, now=now - timedelta(minutes=i))
    seen, cursor = [], None
    for number in range(30):
        page = campaigns.page(session, cursor, 4)
        assert len(page.items) <= 4
        seen += [c.campaign for c in page.items]
        # sent again, and new ones, between pages
        campaigns.count_sent(session, "c05", "promotions", 1, now=utcnow())
        campaigns.count_sent(session, f"new{number}", "news", 1, now=utcnow())
        cursor = page.next_cursor
        if cursor is None:
            break
    assert cursor is None
    assert len(seen) == len(set(seen))
    assert {f"c{i:02d}" for i in range(23)} <= set(seen)
    with pytest.raises(InvalidValue):
        campaigns.page(session, "WzEsMl0")  # [1, 2]: a number where a campaign's name belongs


@pytest.mark.parametrize("name", ["\ud800", "a\udfff\ud800", "a\x00b", "", "x" * 201])
def test_a_cursor_naming_a_campaign_no_database_can_store_is_refused(session, name):
    cursor = cursors.encode(datetime(2026, 1, 1, tzinfo=UTC), name)
    with pytest.raises(InvalidValue):
        campaigns.page(session, cursor, 4)


def test_the_overview_answers_a_cursor_with_a_lone_surrogate_with_a_400(client, session):
    from base64 import b64encode

    key = make_key(session, "admin")
    auth = {"Authorization": "Basic " + b64encode(f"x:{key}".encode()).decode()}
    cursor = cursors.encode(datetime(2026, 1, 1, tzinfo=UTC), "\ud800")
    assert client.get(f"/admin/campaigns?after={cursor}", headers=auth).status_code == 400
