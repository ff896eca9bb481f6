"""The operator's overview in Chromium: Basic auth, the charts drawn, the tables filled."""

import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from prefs.domain import campaigns, keys, ledger
from prefs.domain.changes import Origin
from prefs.domain.compliance import requests as register
from prefs.extensions import db
from prefs.models import Event, utcnow
from tests.factories import make_subscriber, make_topic
from tests.servers import serving

pytestmark = pytest.mark.browser
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "admin-overview.png"


def seed(session):
    """Record three months of a small list's life."""
    for key, name in (
        ("news", "Company news"),
        ("promotions", "Offers and promotions"),
        ("events", "Events"),
    ):
        make_topic(session, key, name=name, opt_in=key == "events")
    sources = ["one-click", "one-click", "page", "preferences", "mailto", "api", "import"]
    campaign_of = ["spring-sale", "may-news", "summer-sale", None]
    now = utcnow()
    campaigns.count_sent(session, "spring-sale", "promotions", 4000, now=now - timedelta(days=60))
    campaigns.count_sent(session, "may-news", "news", 9000, now=now - timedelta(days=30))
    campaigns.count_sent(session, "summer-sale", "promotions", 2500, now=now - timedelta(days=5))
    for i in range(120):
        person = make_subscriber(session, f"person{i}@example.com")
        topic = ("news", "promotions", None)[i % 3]
        origin = Origin(sources[i % len(sources)], campaign=campaign_of[i % 4])
        ledger.record_opt_out(session, person.public_id, topic, origin)
    for event_id in range(1, 121):
        # spread over the last 90 days, busier lately
        days_ago = (event_id * 37) % 90 if event_id % 4 else event_id % 10
        session.execute(
            update(Event).where(Event.id == event_id).values(created_at=now - timedelta(days=days_ago))
        )
    session.commit()
    register.record_request(session, "erasure", "late@example.com", received_at=now - timedelta(days=33))
    register.record_request(session, "access", "recent@example.com", received_at=now - timedelta(days=4))


@pytest.fixture
def overview(app):
    session = db.session()
    seed(session)
    _, secret = keys.create_key(session, "ops", ["admin"])
    with serving(app) as origin:
        yield origin, secret


def test_the_overview_in_a_browser(overview, browser):
    base, secret = overview
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/admin", timeout=10)  # noqa: S310 (loopback)
    assert refused.value.code == 401
    # the shared browser comes from conftest: a browser that cannot start fails there, never skips
    context = browser.new_context(
        http_credentials={"username": "ops", "password": secret},
        viewport={"width": 1100, "height": 900},
    )
    try:
        page = context.new_page()
        response = page.goto(base + "/admin")
        assert response.status == 200
        assert page.title() == "Overview · prefs admin"
        charts = page.locator("img.chart")
        assert charts.count() == 2
        drawn = "[...document.querySelectorAll('img.chart')].every(i => i.complete && i.naturalWidth > 0)"
        page.wait_for_function(f"() => {drawn}")
        assert page.get_by_role("table", name="Opt-outs per day by topic").locator("tbody tr").count() > 5
        sources = page.get_by_role("table", name="Opt-outs by source")
        assert sources.locator("tbody tr").count() == 6
        newest = page.get_by_role("table", name="divided by the recipients")
        assert newest.locator("tbody tr").first.locator("th").inner_text() == "summer-sale"
        requests_table = page.get_by_role("table", name="not yet completed")
        first = requests_table.locator("tbody tr").first
        assert "erasure" in first.inner_text() and "overdue" in first.inner_text()
        assert context.cookies() == []
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.get_by_label("Find a subscriber by address").fill("person5@example.com")
        page.get_by_role("button", name="Search").click()
        page.wait_for_load_state()
        assert page.get_by_role("heading", level=1).inner_text() == "person5@example.com"
        history = page.get_by_role("table", name="History")
        assert "unsubscribe" in history.inner_text()
        # the address went in the POST body, never in the URL
        assert "person5" not in page.url
    finally:
        context.close()
