"""The Host header: links never come from it, and a host the service does not serve gets a 400."""

import json

import pytest

from prefs.extensions import session as db_session
from tests.factories import allowed, make_subscriber, make_topic, unsubscribe_token

BASE = "https://prefs.example.com"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
def served(make_app, smtp_server):
    """Return an app that mails through the loopback server and answers only for its base host."""
    app = make_app(SMTP_URL=smtp_server.url, BASE_URL=BASE, TRUSTED_HOSTS=None)
    with app.app_context():
        make_topic(db_session(), "news")
        make_subscriber(db_session(), "ann@example.com")
    return app


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:443",
        "prefs.example.com.attacker.example",
        "prefs.example.com@attacker.example",
        "attacker.example, prefs.example.com",
        "prefs.example.com:evil",
        "prefs.example.com:99999",
        "[::1]",
        "[::1]:8000",
        "127.0.0.1",
        "prefs.example.com/x",
        "",
        "bad host",
        "prefs.ex\u00e4mple.com",
        "prefs.example.com:",
        "x" * 5000,
        ".prefs.example.com",
        "prefs..example.com",
    ],
)
def test_a_host_the_service_does_not_serve_gets_a_friendly_400_and_no_mail(served, smtp_server, host):
    response = served.test_client().post(
        "/unsubscribe", data={"email": "ann@example.com"}, headers={"Host": host}
    )
    assert response.status_code == 400
    assert response.mimetype == "text/html"
    assert '<link rel="stylesheet"' in response.get_data(as_text=True)  # the friendly page
    assert smtp_server.inbox.messages == []


@pytest.mark.parametrize(
    "host",
    [
        "prefs.example.com",
        "prefs.example.com:443",
        "prefs.example.com:8443",
        "PREFS.Example.COM",
        "prefs.example.com.",
    ],
)
def test_the_base_host_in_any_spelling_is_served_and_links_start_with_the_base_url(served, smtp_server, host):
    response = served.test_client().post(
        "/unsubscribe", data={"email": "ann@example.com"}, headers={"Host": host}
    )
    assert response.status_code == 200
    (message,) = smtp_server.inbox.wait_for(1)
    text = message.get_body(("plain",)).get_content()
    assert f"{BASE}/p/" in text
    assert host.lower() not in text.replace(BASE, "") or host.lower() == "prefs.example.com"


def test_a_forwarded_host_from_a_trusted_proxy_is_checked_as_the_host(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, BASE_URL=BASE, TRUSTED_HOSTS=None, TRUSTED_PROXIES=1)
    client = app.test_client()

    def post(forwarded_host):
        headers = {
            "Host": "10.0.0.7:8000",
            "X-Forwarded-For": "198.51.100.4",
            "X-Forwarded-Host": forwarded_host,
        }
        return client.post("/unsubscribe", data={"email": "ann@example.com"}, headers=headers).status_code

    assert post("attacker.example") == 400
    assert smtp_server.inbox.messages == []
    assert post("prefs.example.com") == 200
    (message,) = smtp_server.inbox.wait_for(1)
    assert "attacker" not in message.get_body(("plain",)).get_content()


def test_trusted_hosts_are_served_too_and_links_still_start_with_the_base_url(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, BASE_URL=BASE, TRUSTED_HOSTS="www.prefs.example.com, 10.0.0.7")
    client = app.test_client()
    for host in ("www.prefs.example.com", "10.0.0.7:8000"):
        assert (
            client.post("/unsubscribe", data={"email": "ann@example.com"}, headers={"Host": host}).status_code
            == 200
        )
    assert client.get("/unsubscribe", headers={"Host": "attacker.example"}).status_code == 400
    for message in smtp_server.inbox.wait_for(2):
        text = message.get_body(("plain",)).get_content()
        assert f"{BASE}/p/" in text and "www." not in text and "10.0.0.7" not in text


def test_a_list_of_trusted_hosts_may_be_json(make_app):
    app = make_app(BASE_URL=BASE, TRUSTED_HOSTS=["www.prefs.example.com"])
    assert app.test_client().get("/unsubscribe", headers={"Host": "www.prefs.example.com"}).status_code == 200


def test_the_api_answers_an_unknown_host_in_its_json_shape(served):
    response = served.test_client().get("/api/v1/topics", headers={"Host": "attacker.example"})
    assert response.status_code == 400
    assert json.loads(response.data)["error"]["code"] == "bad_request"


@pytest.mark.parametrize("host", ["attacker.example", "10.0.0.7:8000", "[::1]:8000", ""])
def test_healthz_answers_whatever_the_host(served, host):
    response = served.test_client().get("/healthz", headers={"Host": host})
    assert response.status_code == 200


def test_a_one_click_for_an_unknown_host_is_refused_and_records_nothing(served):
    with served.app_context():
        token = unsubscribe_token(make_subscriber(db_session(), "ann@example.com"), "news")
    client = served.test_client()
    # the page the layer beneath Flask answers with, rendered once by the view
    assert (
        client.post(f"/u/{token}", data=ONE_CLICK, headers={"Host": "prefs.example.com"}).status_code == 200
    )
    with served.app_context():
        bob = make_subscriber(db_session(), "bob@example.com")
        token = unsubscribe_token(bob, "news")
    response = client.post(f"/u/{token}", data=ONE_CLICK, headers={"Host": "attacker.example"})
    assert response.status_code == 400
    with served.app_context():
        assert allowed(db_session(), "bob@example.com", "news")


def test_an_ipv6_base_url_is_served_under_any_spelling_of_its_address(make_app):
    app = make_app(BASE_URL="http://[::1]:8000", TRUSTED_HOSTS=None)
    client = app.test_client()
    assert client.get("/unsubscribe", headers={"Host": "[::1]:8000"}).status_code == 200
    assert client.get("/unsubscribe", headers={"Host": "[0:0:0:0:0:0:0:1]"}).status_code == 200
    assert client.get("/unsubscribe", headers={"Host": "[::2]:8000"}).status_code == 400


def test_an_international_base_url_is_served_under_its_ascii_name(make_app):
    app = make_app(BASE_URL="https://präferenzen.example", TRUSTED_HOSTS=None)
    client = app.test_client()
    assert client.get("/unsubscribe", headers={"Host": "xn--prferenzen-r5a.example"}).status_code == 200
