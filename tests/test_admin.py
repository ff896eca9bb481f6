"""The operator's overview: Basic auth with an admin key, charts with their numbers, search, pages."""

import base64
import html
import re
from datetime import timedelta

import pytest

from prefs.domain import campaigns, keys, ledger
from prefs.domain.changes import Origin
from prefs.domain.compliance import requests as register
from prefs.domain.compliance import subjects
from prefs.models import utcnow
from tests.factories import make_subscriber, make_topic


@pytest.fixture
def admin_key(session):
    return keys.create_key(session, "ops", ["admin"])[1]


def test_no_or_a_wrong_key_is_401_with_a_basic_challenge(client, session):
    keys.create_key(session, "ops", ["admin"])
    for auth in (None, ("ops", "prefs_wrong"), ("ops", "")):
        response = client.get("/admin", auth=auth)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    bearer = client.get("/admin", headers={"Authorization": "Bearer prefs_x"})
    assert bearer.status_code == 401


def test_a_key_without_the_admin_scope_is_403(client, session):
    _, secret = keys.create_key(session, "mailer", ["send", "read"])
    assert client.get("/admin", auth=("anyone", secret)).status_code == 403


def test_a_revoked_admin_key_is_401(client, session, admin_key):
    keys.revoke_key(session, "ops")
    assert client.get("/admin", auth=("x", admin_key)).status_code == 401


def test_the_overview_shows_charts_tables_campaigns_topics_and_requests(client, session, admin_key):
    make_topic(session, "news", name="Company news")
    ann = make_subscriber(session, "ann@example.com")
    campaigns.count_sent(session, "spring-sale", "news", 200)
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="spring-sale"))
    register.record_request(session, "erasure", "bob@example.com", note="by letter")
    response = client.get("/admin", auth=("ops", admin_key))
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert 'src="/admin/charts/opt-outs.svg"' in page and 'src="/admin/charts/sources.svg"' in page
    assert "<caption>Opt-outs per day by topic" in page and "<caption>Opt-outs by source" in page
    assert "spring-sale" in page and "0.50%" in page and "Company news" in page
    assert "Company news" in page and "b***@example.com" in page
    assert "bob@example.com" not in page
    assert "Set-Cookie" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_charts_are_svg_without_script(client, session, admin_key):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click"))
    for path in ("/admin/charts/opt-outs.svg", "/admin/charts/sources.svg"):
        response = client.get(path, auth=("ops", admin_key))
        assert response.status_code == 200
        assert response.mimetype == "image/svg+xml"
        svg = response.get_data(as_text=True)
        assert svg.startswith("<svg") and "<script" not in svg
    assert client.get("/admin/charts/sources.svg").status_code == 401


def test_search_by_address_shows_the_history(client, session, admin_key):
    make_topic(session, "news", name="Company news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="c7"))
    response = client.post("/admin/search", data={"email": " Ann@Example.com "}, auth=("ops", admin_key))
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "ann@example.com" in page and "c7" in page and "one-click" in page
    assert "not sent: unsubscribed" in page and "always sent" in page


def test_search_for_unknown_invalid_and_erased_addresses(client, session, admin_key):
    make_topic(session, "news")
    assert (
        client.post("/admin/search", data={"email": "no@example.com"}, auth=("o", admin_key)).status_code
        == 404
    )
    invalid = client.post("/admin/search", data={"email": "not-an-address"}, auth=("o", admin_key))
    assert invalid.status_code == 422 and "not a valid address" in invalid.get_data(as_text=True)
    make_subscriber(session, "gone@example.com")
    subjects.erase_subject(session, "gone@example.com")
    erased = client.post("/admin/search", data={"email": "gone@example.com"}, auth=("o", admin_key))
    assert erased.status_code == 404 and "was erased" in erased.get_data(as_text=True)


def test_search_is_post_only(client, admin_key):
    assert client.get("/admin/search?email=ann@example.com", auth=("o", admin_key)).status_code == 405


def test_loading_the_charts_leaves_failed_imports_silent():
    import importlib

    import prefs.web.admin.charts  # noqa: F401

    with pytest.raises(ImportError):
        importlib.import_module("surely_no_such_module_here")


NEXT = re.compile(r'<a rel="next" href="([^"]+)"')
REQUEST_ROW = re.compile(r'<tr class="[^"]*">\s*<td>(\d+)</td>')


def walk(client, key, path, rows, between=lambda number: None):
    """Follow a list's "next" links from ``path``; return the rows of each page and the links followed."""
    pages, links = [], []
    for number in range(200):
        response = client.get(path, auth=("ops", key))
        assert response.status_code == 200, path
        text = response.get_data(as_text=True)
        pages.append(rows(text))
        between(number)
        found = NEXT.search(text)
        if found is None:
            return pages, links
        path = html.unescape(found.group(1))
        links.append(path)
    raise AssertionError("the pages never ended")


def test_the_overview_shows_one_page_of_the_open_requests(client, session, admin_key):
    now = utcnow()
    for i in range(130):
        register.record_request(
            session, "erasure", f"person{i}@example.com", received_at=now - timedelta(hours=i)
        )
    response = client.get("/admin", auth=("ops", admin_key))
    page = response.get_data(as_text=True)
    assert len(REQUEST_ROW.findall(page)) == 50
    assert 'rel="next" href="/admin/requests?' in page
    assert len(response.data) < 60_000


def test_request_pages_walk_the_register_once_while_requests_arrive(client, session, admin_key):
    now = utcnow()
    on_file = [
        register.record_request(
            session, "access", f"p{i}@example.com", received_at=now - timedelta(days=i % 40)
        ).id
        for i in range(120)
    ]
    made = []

    def meanwhile(number):
        for days in (50, 10, 0):
            made.append(
                register.record_request(
                    session,
                    "objection",
                    f"n{number}-{days}@example.com",
                    received_at=now - timedelta(days=days),
                ).id
            )
        register.complete_request(session, made[-2])

    pages, links = walk(
        client, admin_key, "/admin/requests", lambda t: [int(i) for i in REQUEST_ROW.findall(t)], meanwhile
    )
    seen = [i for page in pages for i in page]
    assert len(seen) == len(set(seen)) and set(on_file) <= set(seen) <= set(on_file) | set(made)
    assert all(len(page) <= 50 for page in pages) and len(pages) >= 3
    # no address in any link: the cursor is an opaque position
    assert not any("@" in link or "%40" in link for link in links)
    done, _ = walk(
        client, admin_key, "/admin/requests?status=done", lambda t: [int(i) for i in REQUEST_ROW.findall(t)]
    )
    assert sorted(i for page in done for i in page) == sorted(made[1::3])


def test_campaign_and_topic_pages_walk_each_once(client, session, admin_key):
    for i in range(60):
        make_topic(session, f"topic{i:02d}")
    for i in range(70):
        campaigns.count_sent(session, f"camp{i:02d}", f"topic{i % 60:02d}", 10)
    names = re.compile(r'<th scope="row">([^<]+?)(?: <code>| *</th>)')
    topics, _ = walk(client, admin_key, "/admin/topics", names.findall)
    assert [t for page in topics for t in page] == [f"Topic{i:02d}" for i in range(60)]
    sent, _ = walk(client, admin_key, "/admin/campaigns", names.findall)
    shown = [c for page in sent for c in page]
    assert sorted(shown) == [f"camp{i:02d}" for i in range(70)] and len(sent) == 2


@pytest.mark.parametrize(
    "path",
    [
        "/admin/requests?after=nope",
        "/admin/requests?status=late",
        "/admin/campaigns?after=WzEsMl0",
        "/admin/topics?after=W10",
        "/admin/topics?after=" + "A" * 5000,
        # JSON nested deeper than the parser goes
        "/admin/requests?after=" + base64.urlsafe_b64encode(b"[" * 3000).decode(),
    ],
)
def test_a_tampered_page_link_is_a_400_page(client, admin_key, path):
    response = client.get(path, auth=("ops", admin_key))
    assert response.status_code == 400
    assert "No such page" in response.get_data(as_text=True)
