"""RFC 8058 one-click: one answer, whether the fast path beneath Flask or the view gives it."""

import json
import logging

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from prefs.domain import ledger
from prefs.extensions import limiter
from prefs.extensions import session as db_session
from prefs.models import Event, Subscriber
from tests.factories import allowed, events, make_subscriber, make_topic, unsubscribe_token
from tests.pages import ONE_CLICK, assert_public_headers


@pytest.fixture
def people(session):
    make_topic(session, "news", name="Product news")
    return [make_subscriber(session, f"p{i}@example.com") for i in range(4)]


def post(client, token, **kwargs):
    return client.post(f"/u/{token}", data=ONE_CLICK, **kwargs)


def through_the_view(client, token, **kwargs):
    """Post the same one-click in a form the fast path leaves to the view (a charset in its type)."""
    return client.post(
        f"/u/{token}",
        data=b"List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded; charset=utf-8",
        **kwargs,
    )


def same_answer(a, b):
    """Tell whether two answers are the same: status, page and headers, bar the request's id."""
    headers = [({k: v for k, v in r.headers if k != "X-Request-ID"}) for r in (a, b)]
    return a.status_code == b.status_code and a.get_data() == b.get_data() and headers[0] == headers[1]


def served(make_app, emails, **settings):
    """Return an app with no app context left pushed, and a "news" link for each address."""
    app = make_app(**settings)
    with app.app_context():
        s = db_session()
        make_topic(s, "news")
        tokens = [unsubscribe_token(make_subscriber(s, email), "news") for email in emails]
    return app, tokens


def test_a_one_click_gets_the_same_answer_whichever_path_answers_it(app, client, session, people):
    client_env = {"REMOTE_ADDR": "203.0.113.9"}
    fast = post(client, unsubscribe_token(people[0], "news", "spring"), environ_base=client_env)
    viewed = through_the_view(client, unsubscribe_token(people[1], "news", "spring"), environ_base=client_env)
    assert fast.status_code == 200 and same_answer(fast, viewed)
    assert_public_headers(fast)
    for person in people[:2]:
        assert events(session, person) == [("unsubscribe", "news", "one-click", "spring")]
        assert not allowed(session, person.email, "news") and allowed(session, person.email, "transactional")
    # the same client, the same fingerprint, whichever answered
    prints = session.scalars(select(Event.fingerprint).order_by(Event.id)).all()
    assert len(prints) == 2 and prints[0] == prints[1] and prints[0]
    # a link that does not verify: the same friendly 400, with the form to ask for a new link
    bad_fast, bad_viewed = post(client, "not-a-token"), through_the_view(client, "not-a-token")
    assert bad_fast.status_code == 400 and same_answer(bad_fast, bad_viewed)
    assert "<form" in bad_fast.get_data(as_text=True) and "not-a-token" not in bad_fast.get_data(as_text=True)


def test_every_language_is_answered_from_the_first_one_click(make_app):
    # no app context pushed around the requests: Flask-Babel keeps a context's first language
    app, tokens = served(make_app, [f"p{i}@example.com" for i in range(4)])
    client = app.test_client()
    german = post(client, tokens[0], headers={"Accept-Language": "de"})
    assert german.status_code == 200 and 'lang="de"' in german.get_data(as_text=True)
    again = through_the_view(client, tokens[1], headers={"Accept-Language": "de"})
    assert same_answer(german, again)
    # the page's language switch asks for French; the page itself has no switch (no token in it)
    french = client.post(f"/u/{tokens[2]}?lang=fr", data=ONE_CLICK)
    assert french.status_code == 200 and 'lang="fr"' in french.get_data(as_text=True)
    assert tokens[2] not in french.get_data(as_text=True)
    assert (
        post(client, tokens[3], headers={"Accept-Language": "tlh"}).get_data()
        == post(client, tokens[3]).get_data()
    )
    with app.app_context():
        assert all(not allowed(db_session(), f"p{i}@example.com", "news") for i in range(4))


def test_a_link_counts_each_request_once_against_its_limit_whichever_path(make_app):
    app, (token,) = served(make_app, ["a@example.com"], RATELIMIT_ONE_CLICK="3 per minute")
    client = app.test_client()
    assert post(client, token).status_code == 200
    assert through_the_view(client, token).status_code == 200
    # the page's own form counts against the same limit: the link has used its three
    assert client.post(f"/u/{token}", data={"scope": "all"}).status_code == 200
    for limited in (
        post(client, token),
        through_the_view(client, token),
        client.post(f"/u/{token}", data={}),
    ):
        assert limited.status_code == 429 and 0 < int(limited.headers["Retry-After"]) <= 60
        assert_public_headers(limited)
    # another link has limits of its own
    with app.app_context():
        other = unsubscribe_token(make_subscriber(db_session(), "b@example.com"), "news")
    assert post(client, other).status_code == 200


def test_a_database_fault_is_answered_503_after_one_attempt(app, client, session, people, monkeypatch):
    links = [unsubscribe_token(person, "news") for person in people]
    ids = [person.id for person in people]

    def trail(n):  # a 503 ends the app context's session, and with it the fixture's objects
        return events(db_session(), db_session().get(Subscriber, ids[n]))

    real = ledger.record_opt_out
    attempts = []

    def once_unavailable(*args, **kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise OperationalError("BEGIN IMMEDIATE", None, TimeoutError("the database is busy"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ledger, "record_opt_out", once_unavailable)
    for send in (post, through_the_view):
        attempts.clear()
        response = send(client, links[1])
        # waited out once (a held lock, the busy timeout): answered, not waited out again
        assert response.status_code == 503 and response.headers["Retry-After"] == "5"
        assert attempts == [1] and not trail(1)
        assert "Traceback" not in response.get_data(as_text=True)
        assert_public_headers(response)
    again = post(client, links[1])
    assert again.status_code == 200
    assert trail(1) == [("unsubscribe", "news", "one-click", None)]


def test_a_rate_limit_storage_outage_turns_nobody_away(app, client, session, people, monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("redis is away")

    monkeypatch.setattr(limiter.storage, "incr", unreachable)
    assert post(client, unsubscribe_token(people[1], "news")).status_code == 200
    assert through_the_view(client, unsubscribe_token(people[2], "news")).status_code == 200
    assert not allowed(session, "p1@example.com", "news") and not allowed(session, "p2@example.com", "news")


def test_an_unexpected_error_is_a_500_page_without_internals(app, client, session, people, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(ledger, "record_opt_out", broken)
    for send in (post, through_the_view):
        response = send(client, unsubscribe_token(people[0], "news"))
        assert response.status_code == 500 and "secret internals" not in response.get_data(as_text=True)


def test_one_clicks_are_logged_and_timed_without_the_token(app, client, people, caplog):
    caplog.set_level(logging.INFO, logger="prefs.access")
    timed = {"endpoint": "/u/<token>", "method": "POST"}
    for n, send in enumerate((post, through_the_view)):
        before = REGISTRY.get_sample_value("prefs_request_duration_seconds_count", timed) or 0
        caplog.clear()
        token = unsubscribe_token(people[n], "news")
        response = send(client, token, headers={"X-Request-ID": "mailbox-provider-42"})
        assert response.headers["X-Request-ID"] == "mailbox-provider-42"
        (line,) = [r for r in caplog.records if r.name == "prefs.access"]
        assert (line.route, line.method, line.status, line.request_id) == (
            "/u/<token>",
            "POST",
            200,
            "mailbox-provider-42",
        )
        assert token not in json.dumps(line.__dict__, default=str)
        assert REGISTRY.get_sample_value("prefs_request_duration_seconds_count", timed) == before + 1


def test_behind_a_proxy_one_clicks_fingerprint_the_forwarded_client(make_app):
    app, tokens = served(make_app, [f"q{i}@example.com" for i in range(3)], TRUSTED_PROXIES=1)
    client = app.test_client()
    sends = (post, through_the_view, post)
    for send, token, forwarded in zip(
        sends, tokens, ("198.51.100.7", "198.51.100.7", "198.51.100.8"), strict=True
    ):
        assert send(client, token, headers={"X-Forwarded-For": forwarded}).status_code == 200
    with app.app_context():
        prints = db_session().scalars(select(Event.fingerprint).order_by(Event.id)).all()
    assert prints[0] == prints[1] != prints[2]
