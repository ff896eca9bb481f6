"""The one-click layer beneath Flask: it answers RFC 8058 POSTs as the view would, or hands them on."""

import json
import logging

import pytest
from flask import has_app_context
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from prefs import ledger, oneclick
from prefs.extensions import limiter
from prefs.extensions import session as db_session
from prefs.models import Event, Subscriber
from tests.factories import allowed, events, make_subscriber, make_topic, unsubscribe_token
from tests.pages import ONE_CLICK, assert_public_headers


@pytest.fixture
def people(session):
    make_topic(session, "news", name="Product news")
    return [make_subscriber(session, f"p{i}@example.com") for i in range(4)]


def count_view_calls(app):
    """Return the list of tokens the view is called with from now on."""
    calls = []
    view = app.view_functions["public.unsubscribe"]

    def counted(**kwargs):
        calls.append(kwargs["token"])
        return view(**kwargs)

    app.view_functions["public.unsubscribe"] = counted
    return calls


def post(client, token, **kwargs):
    response = client.post(f"/u/{token}", data=ONE_CLICK, **kwargs)
    if has_app_context():
        # the layer writes on a connection of its own, not in the test's session (which
        # requests the view answers share): the test's read ends, so it sees the write
        db_session().rollback()
    return response


def served(make_app, emails, **settings):
    """Return an app with no app context left pushed, and a "news" link for each address."""
    app = make_app(**settings)
    with app.app_context():
        s = db_session()
        make_topic(s, "news")
        tokens = [unsubscribe_token(make_subscriber(s, email), "news") for email in emails]
    return app, tokens


def test_once_the_view_has_rendered_the_page_one_clicks_are_answered_beneath_it(app, client, session, people):
    calls = count_view_calls(app)
    client_env = {"REMOTE_ADDR": "203.0.113.9"}
    first = post(client, unsubscribe_token(people[0], "news", "spring"), environ_base=client_env)
    second = post(client, unsubscribe_token(people[1], "news", "spring"), environ_base=client_env)
    assert len(calls) == 1  # the first one only: it rendered the page
    assert first.status_code == second.status_code == 200
    assert first.get_data() == second.get_data()
    # the same headers as the view's, bar the request's own id
    assert {k: v for k, v in first.headers if k != "X-Request-ID"} == {
        k: v for k, v in second.headers if k != "X-Request-ID"
    }
    assert_public_headers(second)
    assert events(session, people[1]) == [("unsubscribe", "news", "one-click", "spring")]
    assert not allowed(session, "p1@example.com", "news")
    assert allowed(session, "p1@example.com", "transactional")
    # the same client, the same fingerprint, whichever answered
    prints = session.scalars(select(Event.fingerprint).order_by(Event.id)).all()
    assert len(prints) == 2 and prints[0] == prints[1] and prints[0]


def test_the_layer_and_the_view_count_one_rate_limit_per_link(make_app):
    app, (token,) = served(make_app, ["a@example.com"], RATELIMIT_ONE_CLICK="3 per minute")
    calls = count_view_calls(app)
    client = app.test_client()
    assert [post(client, token).status_code for _ in range(3)] == [200, 200, 200]
    assert len(calls) == 1  # the view counted one, the layer two
    # the page's own form is the view's alone, and the link has used its three
    limited = client.post(f"/u/{token}", data={"scope": "all"})
    assert limited.status_code == 429 and 0 < int(limited.headers["Retry-After"]) <= 60
    assert_public_headers(limited)
    assert post(client, token).status_code == 429


def test_what_the_layer_cannot_answer_goes_to_the_view(make_app):
    # no app context pushed around the requests: Flask-Babel keeps a context's first language
    app, tokens = served(make_app, [f"p{i}@example.com" for i in range(4)])
    calls = count_view_calls(app)
    client = app.test_client()
    assert post(client, tokens[0]).status_code == 200  # renders the page
    # a link that does not verify: the view's friendly 400
    bad = post(client, "not-a-token")
    assert bad.status_code == 400 and "<form" in bad.get_data(as_text=True)
    # a language whose page is not rendered yet: the view renders it, then the layer has it
    german = {"Accept-Language": "de"}
    first, second = (post(client, token, headers=german) for token in tokens[1:3])
    assert first.status_code == second.status_code == 200 and first.get_data() == second.get_data()
    assert 'lang="de"' in second.get_data(as_text=True)
    # a query string (the language switch): the view's
    assert client.post(f"/u/{tokens[3]}?lang=fr", data=ONE_CLICK).status_code == 200
    assert calls == [tokens[0], "not-a-token", tokens[1], tokens[3]]
    with app.app_context():
        assert all(not allowed(db_session(), f"p{i}@example.com", "news") for i in range(4))


def test_a_database_fault_in_the_layer_is_answered_by_the_view(app, client, session, people, monkeypatch):
    links = [unsubscribe_token(person, "news") for person in people]
    ids = [person.id for person in people]

    def trail(n):  # a 503 ends the app context's session, and with it the fixture's objects
        return events(db_session(), db_session().get(Subscriber, ids[n]))

    post(client, links[0])  # the view renders the page
    calls = count_view_calls(app)
    real = ledger.record_opt_out
    faults = []

    def once_unavailable(*args, **kwargs):
        if not faults:
            faults.append(1)
            raise OperationalError("BEGIN IMMEDIATE", None, TimeoutError("the database is busy"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ledger, "record_opt_out", once_unavailable)
    # waited out once beneath the view (a held lock, the busy timeout): the view answers it
    # at once, without a second write that would wait as long again
    response = post(client, links[1])
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert len(calls) == 1 and faults == [1] and not trail(1)
    again = post(client, links[1])
    assert again.status_code == 200 and len(calls) == 1
    assert trail(1) == [("unsubscribe", "news", "one-click", None)]

    def unavailable(*args, **kwargs):
        raise OperationalError("BEGIN IMMEDIATE", None, TimeoutError("the database is busy"))

    monkeypatch.setattr(ledger, "record_opt_out", unavailable)
    down = post(client, links[2])
    assert down.status_code == 503 and down.headers["Retry-After"] == "5"
    assert "Traceback" not in down.get_data(as_text=True)


def test_a_rate_limit_storage_outage_turns_nobody_away(app, client, session, people, monkeypatch):
    post(client, unsubscribe_token(people[0], "news"))
    calls = count_view_calls(app)

    def unreachable(*args, **kwargs):
        raise ConnectionError("redis is away")

    monkeypatch.setattr(limiter.limiter, "hit", unreachable)
    assert post(client, unsubscribe_token(people[1], "news")).status_code == 200
    assert calls == [] and not allowed(session, "p1@example.com", "news")


def test_the_layer_logs_and_times_its_answers_without_the_token(app, client, people, caplog):
    caplog.set_level(logging.INFO, logger="prefs.access")
    post(client, unsubscribe_token(people[0], "news"))
    timed = {"endpoint": "/u/<token>", "method": "POST"}
    before = REGISTRY.get_sample_value("prefs_request_duration_seconds_count", timed)
    caplog.clear()
    token = unsubscribe_token(people[1], "news")
    response = post(client, token, headers={"X-Request-ID": "mailbox-provider-42"})
    assert response.headers["X-Request-ID"] == "mailbox-provider-42"
    lines = [r for r in caplog.records if r.name == "prefs.access"]
    assert len(lines) == 1
    line = lines[0]
    assert (line.route, line.method, line.status, line.request_id) == (
        "/u/<token>",
        "POST",
        200,
        "mailbox-provider-42",
    )
    assert token not in json.dumps(line.__dict__, default=str)
    assert REGISTRY.get_sample_value("prefs_request_duration_seconds_count", timed) == before + 1
    # the route and endpoint the layer answers for are the view's
    (rule,) = [r for r in app.url_map.iter_rules() if r.endpoint == oneclick.ENDPOINT]
    assert rule.rule == oneclick.ROUTE and rule.rule.startswith(oneclick.PREFIX)


def test_behind_a_proxy_the_layer_fingerprints_the_forwarded_client(make_app):
    app, tokens = served(make_app, [f"q{i}@example.com" for i in range(3)], TRUSTED_PROXIES=1)
    calls = count_view_calls(app)
    client = app.test_client()
    for token, forwarded in zip(tokens, ("198.51.100.7", "198.51.100.7", "198.51.100.8"), strict=True):
        assert post(client, token, headers={"X-Forwarded-For": forwarded}).status_code == 200
    assert len(calls) == 1
    with app.app_context():
        prints = db_session().scalars(select(Event.fingerprint).order_by(Event.id)).all()
    assert prints[0] == prints[1] != prints[2]
