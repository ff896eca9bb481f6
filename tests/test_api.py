"""The mailer API: authentication, the error shape, check, events, topics, subjects."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from prefs.domain import ledger
from prefs.domain.changes import Origin
from prefs.models import Event, Subscriber, utcnow
from prefs.web.api.schemas import CheckResult
from tests.factories import bearer, make_key, make_subscriber, make_topic


@pytest.fixture
def keys(session):
    return {scope: bearer(make_key(session, scope)) for scope in ("send", "read", "write", "admin")}


def check(client, keys, topic, recipients, **extra):
    body = {"topic": topic, "recipients": recipients, **extra}
    return client.post("/api/v1/check", json=body, headers=keys["send"])


# authentication


def test_no_key_unknown_key_and_revoked_key_are_401(client, session):
    from prefs.domain.keys import revoke_key

    secret = make_key(session, "send", name="old")
    revoke_key(session, "old")
    for headers in ({}, bearer("prefs_nope"), bearer(secret), {"Authorization": "Basic abc"}):
        response = client.post(
            "/api/v1/check", json={"topic": "transactional", "recipients": ["a@b.co"]}, headers=headers
        )
        assert response.status_code == 401
        assert response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_key_without_the_scope_is_403(client, keys):
    response = client.post(
        "/api/v1/check", json={"topic": "transactional", "recipients": ["a@b.co"]}, headers=keys["read"]
    )
    assert response.status_code == 403
    assert response.json["error"]["code"] == "forbidden"


# errors


def test_malformed_json_is_400(client, keys):
    response = client.post(
        "/api/v1/check", data=b"{nope", content_type="application/json", headers=keys["send"]
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == "malformed_json"


def test_invalid_utf8_and_deep_nesting_are_400(client, keys):
    for body in (b'{"topic": "\xff"}', b"[" * 10_000 + b"]" * 10_000):
        response = client.post(
            "/api/v1/check", data=body, content_type="application/json", headers=keys["send"]
        )
        assert response.status_code == 400


def test_wrong_content_type_is_415(client, keys):
    response = client.post("/api/v1/check", data="topic=x", content_type="text/plain", headers=keys["send"])
    assert response.status_code == 415


def test_a_body_over_the_limit_is_413(make_app, session):
    app = make_app(MAX_BODY_BYTES=1000)
    with app.app_context():
        from prefs.extensions import session as current

        secret = make_key(current(), "send")
    client = app.test_client()
    response = client.post(
        "/api/v1/check",
        data=b'{"recipients": ["' + b"a" * 5000 + b'"]}',
        content_type="application/json",
        headers=bearer(secret),
    )
    assert response.status_code == 413
    assert response.json["error"]["code"] == "request_entity_too_large"


def test_validation_failures_are_422_with_the_fields(client, keys):
    response = check(client, keys, "transactional", [])
    assert response.status_code == 422
    assert "recipients" in response.json["error"]["fields"]
    response = client.post("/api/v1/check", json={"recipients": ["a@b.co"], "extra": 1}, headers=keys["send"])
    assert set(response.json["error"]["fields"]) == {"topic", "extra"}
    too_many = check(client, keys, "transactional", ["a@b.co"] * 10_001)
    assert too_many.status_code == 422
    not_strings = check(client, keys, "transactional", ["a@b.co", 7])
    assert not_strings.status_code == 422
    bad_campaign = check(client, keys, "transactional", ["a@b.co"], campaign="x" * 65)
    assert "campaign" in bad_campaign.json["error"]["fields"]


def test_an_unknown_topic_is_422(client, keys):
    response = check(client, keys, "nope", ["a@b.co"])
    assert response.status_code == 422
    assert "topic" in response.json["error"]["fields"]


# check


def test_check_answers_each_recipient_in_order(client, keys, session):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page"))
    recipients = ["new@example.com", "Ann@Example.com", "not an address", "new@example.com"]
    response = check(client, keys, "news", recipients, campaign="spring")
    assert response.status_code == 200
    results = response.json["results"]
    assert [r["email"] for r in results] == recipients
    assert [(r["allowed"], r["reason"]) for r in results] == [
        (True, None),
        (False, "unsubscribed"),
        (False, "invalid_address"),
        (True, None),
    ]
    allowed = results[0]
    assert allowed["unsubscribe_url"].startswith("https://prefs.example.com/u/")
    assert allowed["preferences_url"].startswith("https://prefs.example.com/p/")
    assert allowed["headers"] == {
        "List-Unsubscribe": f"<{allowed['unsubscribe_url']}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert results[3]["unsubscribe_url"] == allowed["unsubscribe_url"]
    assert results[1]["headers"] is None and results[1]["unsubscribe_url"] is None
    for result in results:
        assert CheckResult().validate(result) == {}
        assert "new@" not in (result["unsubscribe_url"] or "")


@pytest.mark.parametrize("size", [1, 500, 501, 1201])
def test_a_large_check_is_one_json_document_with_its_length(client, keys, session, size):
    # the body is written in pieces of 500 results: every boundary still parses, in order
    make_topic(session, "news")
    recipients = [f"person{i}@example.com" for i in range(size)]
    response = check(client, keys, "news", recipients)
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == len(response.data)
    assert [r["email"] for r in response.json["results"]] == recipients


def test_the_token_carries_the_campaign_and_opens_the_preference_center(app, client, keys, session):
    make_topic(session, "news")
    result = check(client, keys, "news", ["ann@example.com"], campaign="c-7").json["results"][0]
    token = result["unsubscribe_url"].rsplit("/", 1)[1]
    named = app.extensions["prefs.tokens"].read_unsubscribe(token)
    assert (named.topic, named.campaign) == ("news", "c-7")
    assert result["preferences_url"].rsplit("/", 1)[1] == token


def test_the_mailto_part_appears_when_configured(make_app):
    app = make_app(UNSUBSCRIBE_MAILTO="unsubscribe@example.com")
    with app.app_context():
        from prefs.extensions import session as current

        make_topic(current(), "news")
        secret = make_key(current(), "send")
    response = app.test_client().post(
        "/api/v1/check", json={"topic": "news", "recipients": ["a@example.com"]}, headers=bearer(secret)
    )
    result = response.json["results"][0]
    token = result["unsubscribe_url"].rsplit("/", 1)[1]
    assert result["headers"]["List-Unsubscribe"] == (
        f"<{result['unsubscribe_url']}>, <mailto:unsubscribe@example.com?subject=unsubscribe-{token}>"
    )


def test_transactional_is_always_allowed_and_has_no_unsubscribe_headers(client, keys, session):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, None, Origin("api"), reason="complained")
    bob = make_subscriber(session, "bob@example.com")
    ledger.record_opt_out(session, bob.public_id, None, Origin("api"), reason="bounced")
    results = check(client, keys, "transactional", ["ann@example.com", "bob@example.com", "x@y"]).json[
        "results"
    ]
    ann_result, bob_result, invalid = results
    assert ann_result["allowed"] is True and ann_result["reason"] is None
    assert ann_result["headers"] is None and ann_result["unsubscribe_url"] is None
    assert ann_result["preferences_url"].startswith("https://prefs.example.com/p/")
    assert "warnings" not in ann_result
    assert bob_result["allowed"] is True and bob_result["warnings"] == ["hard_bounce"]
    assert invalid["reason"] == "invalid_address"


def test_every_reason_in_one_call(client, keys, session):
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    people = {}
    for name, action in [
        ("topic", lambda p: ledger.record_opt_out(session, p, "events", Origin("api"))),
        ("all", lambda p: ledger.record_opt_out(session, p, None, Origin("api"))),
        ("complained", lambda p: ledger.record_opt_out(session, p, None, Origin("api"), "complained")),
        ("bounced", lambda p: ledger.record_opt_out(session, p, None, Origin("api"), "bounced")),
        ("fan", lambda p: ledger.record_resubscribe(session, p, "events", Origin("api"))),
    ]:
        person = make_subscriber(session, f"{name}@example.com")
        action(person.public_id)
        people[name] = person
    recipients = [f"{n}@example.com" for n in ("topic", "all", "complained", "bounced", "fan", "stranger")]
    reasons = [r["reason"] for r in check(client, keys, "events", recipients).json["results"]]
    assert reasons == ["unsubscribed", "unsubscribed_all", "complained", "bounced", None, "not_subscribed"]


def test_new_recipients_become_subscribers_once(client, keys, session):
    make_topic(session, "news")
    first = check(client, keys, "news", ["new@example.com", "NEW@example.com"]).json["results"]
    second = check(client, keys, "news", ["new@example.com"]).json["results"]
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 1
    tokens = [r["unsubscribe_url"].rsplit("/", 1)[1].split(".")[0] for r in first + second]
    assert len(set(tokens)) == 1


def test_the_check_uses_a_bounded_number_of_statements(app, client, keys, session, monkeypatch):
    from sqlalchemy import event

    from prefs.domain import checks
    from prefs.extensions import db

    make_topic(session, "news")
    statements = []

    def count(*args):
        statements.append(args[2])

    # the bulk statements run on the driver's cursor, past SQLAlchemy's events: count them too
    real_driver_rows = checks.driver_rows

    def counted(session, sql, params):
        statements.append(sql)
        return real_driver_rows(session, sql, params)

    monkeypatch.setattr(checks, "driver_rows", counted)

    def run(n, offset):
        statements.clear()
        event.listen(db.engine, "before_cursor_execute", count)
        recipients = [f"user{i}@example.com" for i in range(offset, offset + n)]
        response = check(client, keys, "news", recipients)
        event.remove(db.engine, "before_cursor_execute", count)
        assert response.status_code == 200
        return len(statements)

    run(3, 100_000)  # first use makes the fingerprint key
    small = run(10, 0)
    small_texts = set(statements)
    large = run(4000, 10)
    assert large == small
    # the same texts whatever the size: SQLite keeps every distinct text prepared (about
    # 1 MB each for thousands of placeholders), which grew each worker check after check
    assert set(statements) == small_texts
    known = run(4000, 10)
    assert known < small


# events


def test_events_are_answered_in_order_and_repeat_harmlessly(client, keys, session):
    make_topic(session, "news")
    body = {
        "events": [
            {"type": "unsubscribe", "email": "ann@example.com", "topic": "news", "campaign": "c1"},
            {"type": "complaint", "email": "bob@example.com", "at": "2026-11-30T10:00:00Z"},
            {"type": "hard_bounce", "email": "cat@example.com"},
            {"type": "unsubscribe", "email": "dan@example.com"},
            {"type": "explode", "email": "x@example.com"},
            {"type": "unsubscribe", "email": "not an address"},
            {"type": "unsubscribe", "email": "eve@example.com", "topic": "nope"},
            {"type": "unsubscribe", "email": "fay@example.com", "topic": "news"},
        ]
    }
    response = client.post("/api/v1/events", json=body, headers=keys["write"])
    assert response.status_code == 200
    results = response.json["results"]
    assert [r["status"] for r in results] == ["accepted"] * 4 + ["error"] * 3 + ["accepted"]
    assert all(r["changed"] for r in results if r["status"] == "accepted")
    assert results[4]["error"]["code"] == "validation_failed"
    assert results[5]["error"]["code"] == "invalid_address"
    assert results[6]["error"]["code"] == "unknown_topic"
    verdict = lambda email: ledger.verdict_for(session, email, "news").reason  # noqa: E731
    assert verdict("ann@example.com") == "unsubscribed"
    assert verdict("bob@example.com") == "complained"
    assert verdict("cat@example.com") == "bounced"
    assert verdict("dan@example.com") == "unsubscribed_all"
    bob_event = session.scalar(select(Event).join(Subscriber).where(Subscriber.email == "bob@example.com"))
    assert bob_event.created_at.isoformat().startswith("2026-11-30T10:00:00")
    again = client.post("/api/v1/events", json=body, headers=keys["write"]).json["results"]
    assert [r.get("changed") for r in again if r["status"] == "accepted"] == [False] * 5
    assert session.scalar(select(func.count()).select_from(Event)) == 5
    back = {"events": [{"type": "resubscribe", "email": "dan@example.com"}]}
    assert client.post("/api/v1/events", json=back, headers=keys["write"]).json["results"][0]["changed"]
    assert verdict("dan@example.com") is None


def test_events_limit_is_1000(client, keys):
    body = {"events": [{"type": "unsubscribe", "email": "a@example.com"}] * 1001}
    assert client.post("/api/v1/events", json=body, headers=keys["write"]).status_code == 422


# topics


def test_topics_create_list_patch(client, keys):
    created = client.post(
        "/api/v1/topics",
        json={"key": "news", "name": "News", "description": "Monthly", "default": "opt-in"},
        headers=keys["admin"],
    )
    assert created.status_code == 201
    assert created.json == {
        "key": "news",
        "name": "News",
        "description": "Monthly",
        "default": "opt-in",
        "archived": False,
    }
    duplicate = client.post("/api/v1/topics", json={"key": "news", "name": "Again"}, headers=keys["admin"])
    assert duplicate.status_code == 409
    reserved = client.post(
        "/api/v1/topics", json={"key": "transactional", "name": "No"}, headers=keys["admin"]
    )
    assert reserved.status_code == 422 and "key" in reserved.json["error"]["fields"]
    patched = client.patch(
        "/api/v1/topics/news", json={"archived": True, "name": "Old news"}, headers=keys["admin"]
    )
    assert patched.json["archived"] is True and patched.json["name"] == "Old news"
    assert (
        client.patch("/api/v1/topics/nope", json={"archived": True}, headers=keys["admin"]).status_code == 404
    )
    listing = client.get("/api/v1/topics", headers=keys["admin"]).json["topics"]
    assert [t["key"] for t in listing] == ["news"]


# subjects


def test_access_returns_everything_held(client, keys, session):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page", fingerprint="f" * 32))
    response = client.get("/api/v1/subscribers/Ann@Example.com", headers=keys["admin"])
    assert response.status_code == 200
    body = response.json
    assert body["subscriber"]["email"] == "ann@example.com"
    assert body["preferences"] == [
        {
            "topic": "news",
            "subscribed": False,
            "source": "page",
            "updated_at": body["preferences"][0]["updated_at"],
        }
    ]
    assert [e["action"] for e in body["events"]] == ["unsubscribe"]
    assert client.get("/api/v1/subscribers/nobody@example.com", headers=keys["admin"]).status_code == 404
    assert client.get("/api/v1/subscribers/not-an-address", headers=keys["admin"]).status_code == 404


def test_erasure_removes_the_address_everywhere_and_keeps_it_out(client, keys, session, app):
    from sqlalchemy import inspect, text

    from prefs.extensions import db

    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    public_id = ann.public_id
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page", fingerprint="f" * 32))
    ledger.record_resubscribe(session, ann.public_id, "news", Origin("page"))
    assert client.delete("/api/v1/subscribers/ann@example.com", headers=keys["admin"]).status_code == 204
    assert client.delete("/api/v1/subscribers/ann@example.com", headers=keys["admin"]).status_code == 404
    with db.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                assert "ann@example.com" not in repr(row), table
                assert public_id not in repr(row), table
    result = check(client, keys, "news", ["ann@example.com"]).json["results"][0]
    assert (result["allowed"], result["reason"]) == (False, "erased")
    transactional = check(client, keys, "transactional", ["ann@example.com"]).json["results"][0]
    assert transactional["allowed"] is True and transactional["preferences_url"] is None
    # a later report does not bring the address back
    client.post(
        "/api/v1/events",
        json={"events": [{"type": "unsubscribe", "email": "ann@example.com"}]},
        headers=keys["write"],
    )
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 0


def test_given_addresses_are_echoed_as_valid_json(client, keys, session):
    make_topic(session, "news")
    odd = [
        '"quoted"@example.com',
        "ünï@exämple.de",
        "a\u2028b@example.com",
        "x\\y\x01@example.com",
        "</script>",
    ]
    response = check(client, keys, "news", odd)
    assert response.status_code == 200
    assert [r["email"] for r in response.json["results"]] == odd
    assert response.json["results"][1]["allowed"] is True


# limits, counting, the request register


def test_each_key_has_its_own_rate_limit(make_app):
    app = make_app(RATELIMIT_API_KEY="2 per minute")
    with app.app_context():
        from prefs.extensions import session as current

        first, second = (
            make_key(current(), "admin", name="first"),
            make_key(current(), "admin", name="second"),
        )
    client = app.test_client()
    statuses = [client.get("/api/v1/topics", headers=bearer(first)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    limited = client.get("/api/v1/topics", headers=bearer(first))
    assert limited.json["error"]["code"] == "rate_limited"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    # another key is not held back by the first one's use
    assert client.get("/api/v1/topics", headers=bearer(second)).status_code == 200
    # and no key at all is refused before it could spend anyone's limit
    assert client.get("/api/v1/topics").status_code == 401


def test_the_check_counts_allowed_recipients_per_campaign(client, keys, session):
    from prefs.models import CampaignSend

    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page"))
    check(client, keys, "news", ["ann@example.com", "bob@example.com", "cat@example.com"], campaign="c1")
    check(client, keys, "news", ["dan@example.com"], campaign="c1")
    check(client, keys, "news", ["eve@example.com"])  # no campaign: nothing to count
    check(client, keys, "transactional", ["fay@example.com"], campaign="c1")
    [row] = session.scalars(select(CampaignSend)).all()
    assert (row.campaign, row.allowed) == ("c1", 3)


def test_the_request_register_over_the_api(client, keys, session):
    make_topic(session, "news")
    make_subscriber(session, "ann@example.com")
    created = client.post(
        "/api/v1/requests",
        json={"type": "access", "email": "Ann@Example.com", "note": "by phone"},
        headers=keys["admin"],
    )
    assert created.status_code == 201
    body = created.json
    assert body["subject"] == "a***@example.com" and "ann@example.com" not in created.get_data(as_text=True)
    assert body["overdue"] is False and body["completed_at"] is None
    late = client.post(
        "/api/v1/requests",
        json={"type": "objection", "email": "bob@example.com", "received_at": "2026-10-01T09:00:00Z"},
        headers=keys["admin"],
    ).json
    assert late["overdue"] is True and late["due_at"].startswith("2026-10-31")
    listing = client.get("/api/v1/requests?status=open", headers=keys["admin"]).json
    assert [r["id"] for r in listing["items"]] == [late["id"], body["id"]]  # overdue first
    assert listing["next_cursor"] is None
    assert [
        r["id"] for r in client.get("/api/v1/requests?status=overdue", headers=keys["admin"]).json["items"]
    ] == [late["id"]]
    done = client.post(f"/api/v1/requests/{body['id']}/complete", headers=keys["admin"])
    assert done.status_code == 200
    assert (
        done.json["outcome"] == "exported" and done.json["export"]["subscriber"]["email"] == "ann@example.com"
    )
    objected = client.post(
        f"/api/v1/requests/{late['id']}/complete", json={"note": "done"}, headers=keys["admin"]
    )
    assert objected.json["outcome"] == "unsubscribed"
    assert ledger.verdict_for(session, "bob@example.com", "news").reason == "unsubscribed_all"
    again = client.post(f"/api/v1/requests/{late['id']}/complete", headers=keys["admin"])
    assert again.status_code == 409
    assert client.post("/api/v1/requests/999/complete", headers=keys["admin"]).status_code == 404
    bad = client.post(
        "/api/v1/requests", json={"type": "gossip", "email": "x@example.com"}, headers=keys["admin"]
    )
    assert bad.status_code == 422 and "type" in bad.json["error"]["fields"]
    future = client.post(
        "/api/v1/requests",
        json={"type": "access", "email": "x@example.com", "received_at": "2099-01-01T00:00:00Z"},
        headers=keys["admin"],
    )
    assert future.status_code == 422


# small inputs that must never reach the database as they are


def raw_json(client, method, path, text, headers):
    """Send ``text`` as the JSON body, escapes and all, exactly as written."""
    return client.open(
        path, method=method, data=text.encode(), content_type="application/json", headers=headers
    )


def assert_json_4xx(response):
    assert 400 <= response.status_code < 500, (response.status_code, response.get_data()[:200])
    assert response.json["error"]["code"]


@pytest.mark.parametrize("bad", ["\\ud800", "\\udfff", "x\\u0000y"])
def test_a_lone_surrogate_or_a_nul_in_any_text_is_a_json_4xx(client, keys, session, bad):
    make_topic(session, "news")
    admin = keys["admin"]
    for method, path, text in (
        ("POST", "/api/v1/topics", f'{{"key": "t1", "name": "N{bad}"}}'),
        ("POST", "/api/v1/topics", f'{{"key": "t2", "name": "N", "description": "D{bad}"}}'),
        ("PATCH", "/api/v1/topics/news", f'{{"name": "N{bad}"}}'),
        ("PATCH", "/api/v1/topics/news", f'{{"description": "D{bad}"}}'),
        ("POST", "/api/v1/requests", f'{{"type": "access", "email": "a@example.com", "note": "n{bad}"}}'),
        ("POST", "/api/v1/topics", f'{{"key": "t{bad}", "name": "N"}}'),
    ):
        assert_json_4xx(raw_json(client, method, path, text, admin))
    opened = client.post("/api/v1/requests", json={"type": "access", "email": "a@example.com"}, headers=admin)
    done = raw_json(
        client, "POST", f"/api/v1/requests/{opened.json['id']}/complete", f'{{"note": "n{bad}"}}', admin
    )
    assert_json_4xx(done)
    check_body = f'{{"topic": "news", "recipients": ["a@example.com"], "campaign": "c{bad}"}}'
    assert_json_4xx(raw_json(client, "POST", "/api/v1/check", check_body, keys["send"]))
    # a batch of events answers each in order: the bad one is an error, the good one counts
    events = (
        f'{{"events": [{{"type": "unsubscribe", "email": "ann@example.com", "campaign": "c{bad}"}},'
        f' {{"type": "unsubscribe", "email": "b{bad}@example.com"}},'
        f' {{"type": "unsubscribe", "email": "bob@example.com", "topic": "news{bad}"}},'
        ' {"type": "unsubscribe", "email": "cat@example.com"}]}'
    )
    response = raw_json(client, "POST", "/api/v1/events", events, keys["write"])
    assert response.status_code == 200
    assert [r["status"] for r in response.json["results"]] == ["error", "error", "error", "accepted"]
    assert [t["name"] for t in client.get("/api/v1/topics", headers=admin).json["topics"]] == ["News"]


@pytest.mark.parametrize(
    "moment",
    [
        "9999-12-31T23:59:59-23:59",  # after the year 9999 in UTC
        "0001-01-01T00:00:00+23:59",  # before the year 1 in UTC
        "9999-12-31T23:59:59.999999-00:01",
    ],
)
def test_a_time_that_leaves_the_calendar_in_utc_is_a_json_4xx(client, keys, session, moment):
    make_topic(session, "news")
    request = client.post(
        "/api/v1/requests",
        json={"type": "access", "email": "a@example.com", "received_at": moment},
        headers=keys["admin"],
    )
    assert request.status_code == 422 and "received_at" in request.json["error"]["fields"]
    events = [
        {"type": kind, "email": "ann@example.com", "at": moment}
        for kind in ("unsubscribe", "complaint", "hard_bounce", "resubscribe")
    ]
    response = client.post("/api/v1/events", json={"events": events}, headers=keys["write"])
    assert response.status_code == 200
    assert {r["error"]["code"] for r in response.json["results"]} == {"validation_failed"}
    assert session.scalar(select(func.count()).select_from(Event)) == 0


def test_the_edges_of_the_calendar_in_utc_are_taken_and_stored_as_utc(client, keys, session):
    make_topic(session, "news")
    events = [
        {"type": "unsubscribe", "email": "ann@example.com", "topic": "news", "at": "0001-01-01T00:00:00Z"},
        {"type": "unsubscribe", "email": "bob@example.com", "topic": "news", "at": "9999-12-31T23:59:59Z"},
        {
            "type": "unsubscribe",
            "email": "cat@example.com",
            "topic": "news",
            "at": "2026-01-01T05:30:00+05:30",
        },
    ]
    response = client.post("/api/v1/events", json={"events": events}, headers=keys["write"])
    assert [r["status"] for r in response.json["results"]] == ["accepted"] * 3
    for email, stored in (
        ("ann@example.com", "0001-01-01T00:00:00Z"),
        ("bob@example.com", "9999-12-31T23:59:59Z"),
        ("cat@example.com", "2026-01-01T00:00:00Z"),  # the same instant, in UTC
    ):
        export = client.get(f"/api/v1/subscribers/{email}", headers=keys["admin"])
        assert export.status_code == 200
        assert export.json["events"][0]["at"] == stored


@pytest.mark.parametrize("field", ["campaign", "topic"])
def test_a_key_with_a_trailing_line_feed_is_refused_per_item(client, keys, session, field):
    make_topic(session, "news")
    value = {"campaign": "c" * 64 + "\n", "topic": "news\n"}[field]
    events = [
        {"type": "unsubscribe", "email": "ann@example.com", "topic": "news", field: value},
        {"type": "unsubscribe", "email": "bob@example.com", "topic": "news", "campaign": "c1"},
    ]
    response = client.post("/api/v1/events", json={"events": events}, headers=keys["write"])
    assert response.status_code == 200
    first, second = response.json["results"]
    assert first["status"] == "error" and field in first["error"]["fields"]
    assert second == {"status": "accepted", "changed": True}
    assert session.scalars(select(Event.campaign)).all() == ["c1"]
    checked = check(client, keys, "news", ["ann@example.com"], campaign="c1\n")
    assert checked.status_code == 422 and "campaign" in checked.json["error"]["fields"]
    listed = client.get("/api/v1/suppressions?topic=news%0A", headers=keys["read"])
    assert listed.status_code == 422 and "topic" in listed.json["error"]["fields"]


def test_the_openapi_document_states_the_key_patterns_as_ecma_anchors(client):
    schemas = client.get("/api/v1/openapi.json").json["components"]["schemas"]
    campaign, topic = "^[A-Za-z0-9._~-]{1,64}$", "^[a-z0-9][a-z0-9_-]{0,63}$"
    assert schemas["CheckRequest"]["properties"]["campaign"]["pattern"] == campaign
    # each event's fields are documented, though each is loaded (and answered) on its own
    assert schemas["EventsRequest"]["properties"]["events"]["items"] == {
        "$ref": "#/components/schemas/EventItem"
    }
    assert schemas["EventItem"]["properties"]["campaign"]["pattern"] == campaign
    assert schemas["EventItem"]["properties"]["topic"]["pattern"] == topic


def test_a_resubscribe_the_rules_refuse_is_answered_with_what_keeps_the_address_out(client, keys, session):
    make_topic(session, "news")
    events = [
        {"type": "complaint", "email": "ann@example.com"},
        {"type": "hard_bounce", "email": "bob@example.com"},
        {"type": "unsubscribe", "email": "cat@example.com"},
    ]
    client.post("/api/v1/events", json={"events": events}, headers=keys["write"])
    back = [
        {"type": "resubscribe", "email": "ann@example.com"},
        {"type": "resubscribe", "email": "ann@example.com", "topic": "news"},
        {"type": "resubscribe", "email": "bob@example.com"},
        {"type": "resubscribe", "email": "cat@example.com", "topic": "news"},
    ]
    results = client.post("/api/v1/events", json={"events": back}, headers=keys["write"]).json["results"]
    assert results == [
        {"status": "accepted", "changed": False, "reason": "complained"},
        {"status": "accepted", "changed": False, "reason": "complained"},
        {"status": "accepted", "changed": True},  # a mailer that knows the address works again
        {"status": "accepted", "changed": True},
    ]
    assert ledger.verdict_for(session, "ann@example.com", "news").reason == "complained"
    assert ledger.verdict_for(session, "bob@example.com", "news").allowed
    assert ledger.verdict_for(session, "cat@example.com", "news").allowed


def test_request_pages_walk_the_register_exactly_once(client, keys, session):
    def record(email, days_ago):
        received = (utcnow() - timedelta(days=days_ago)).isoformat()
        body = {"type": "erasure", "email": email, "received_at": received}
        response = client.post("/api/v1/requests", json=body, headers=keys["admin"])
        assert response.status_code == 201
        return response.json["id"]

    on_file = [record(f"p{i}@example.com", days) for i, days in enumerate([40, 31, 20, 20, 5, 0] * 4)]
    made, seen, cursor = [], [], None
    for number in range(50):
        path = "/api/v1/requests?status=open&limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(path, headers=keys["admin"])
        assert page.status_code == 200
        assert len(page.json["items"]) <= 4
        seen += [r["id"] for r in page.json["items"]]
        # recorded between pages: due before, among and after the pages read so far
        made += [record(f"new{number}-{d}@example.com", d) for d in (45, 20, 1)]
        cursor = page.json["next_cursor"]
        if cursor is None:
            break
    assert cursor is None
    assert len(seen) == len(set(seen))
    assert set(on_file) <= set(seen) <= set(on_file) | set(made)
    assert "@" not in "".join(str(x) for x in seen) + str(cursor)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=10001",
        "limit=99999999999999999999999",
        "limit=ten",
        "limit=1.5",
        "limit=",
        "status=late",
        "cursor=",
        "cursor=%00",
        "cursor=not-a-cursor",
        "cursor=WyJhIiwxXQ",  # ["a",1]
        "cursor=Wy0xLDFd",  # [-1,1]
        "cursor=Wzk5OTk5OTk5OTk5OTk5OTk5OTksMV0",  # a time beyond year 9999
        "cursor=W1tdXQ",  # [[]]
        "cursor=" + "W" * 300,
    ],
)
def test_request_pages_refuse_bad_limits_and_cursors_with_422(client, keys, query):
    response = client.get(f"/api/v1/requests?{query}", headers=keys["admin"])
    assert response.status_code == 422, response.get_data(as_text=True)
    assert response.json["error"]["code"] == "validation_failed"


def test_a_well_formed_cursor_is_only_a_position(client, keys, session):
    make_subscriber(session, "ann@example.com")
    client.post(
        "/api/v1/requests", json={"type": "access", "email": "ann@example.com"}, headers=keys["admin"]
    )
    # [1, 2]: one microsecond after the year 1, request 2: everything due after it
    response = client.get("/api/v1/requests?cursor=WzEsMl0", headers=keys["admin"])
    assert response.status_code == 200 and len(response.json["items"]) == 1


@pytest.mark.parametrize(
    "email",
    [
        "a/b@example.com",
        "/ann@example.com",
        "ann/@example.com",
        "a//b@example.com",
        "a/./b@example.com",
        "a?b#c%d@example.com",
    ],
)
def test_any_valid_address_can_be_named_in_the_subject_routes(client, keys, session, email):
    from urllib.parse import quote

    make_subscriber(session, email)
    path = "/api/v1/subscribers/" + quote(email, safe="")
    response = client.get(path, headers=keys["admin"])
    assert response.status_code == 200, response.status_code
    assert response.json["subscriber"]["email"] == email
    assert "Location" not in response.headers
    assert client.delete(path, headers=keys["admin"]).status_code == 204
    assert client.get(path, headers=keys["admin"]).status_code == 404
