"""Mail to the unsubscribe address: by token, by proven sender, and nothing else."""

import smtplib
import socket
import time

import pytest

from prefs import inbound, ledger, receiver
from prefs.tokens import Tokens
from tests.factories import bearer, make_key, make_subscriber, make_topic


@pytest.fixture
def writer(session):
    return bearer(make_key(session, "write"))


def message(subject="unsubscribe", sender="Ann <ann@example.com>", to="unsubscribe@example.com", extra=""):
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
        "Message-ID: <1@example.com>\r\n\r\nPlease stop.\r\n"
    ).encode()


def post(client, writer, raw):
    return client.post("/api/v1/inbound", data=raw, content_type="message/rfc822", headers=writer)


def token_for(app, subscriber, topic=None, campaign=None):
    return app.extensions["prefs.tokens"].unsubscribe(subscriber.public_id, topic, campaign)


def test_a_token_in_the_subject_records_that_opt_out(app, client, writer, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = token_for(app, ann, "news", "c9")
    response = post(client, writer, message(subject=f"unsubscribe-{token}", sender="someone@else.example"))
    assert response.status_code == 200
    assert response.json == {"action": "unsubscribed", "scope": "news", "reason": "token in the message"}
    assert ledger.verdict_for(session, ann.email, "news").reason == "unsubscribed"
    [(event, _)] = ledger.history(session, ann)
    assert (event.source, event.campaign) == ("mailto", "c9")
    again = post(client, writer, message(subject=f"unsubscribe-{token}"))
    assert again.json["action"] == "already_unsubscribed"


def test_a_token_in_the_recipient_local_part(app, client, writer, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = token_for(app, ann)
    response = post(client, writer, message(subject="bye", to=f"unsubscribe+{token}@example.com"))
    assert response.json["action"] == "unsubscribed" and response.json["scope"] == "all"


def test_a_forged_token_does_nothing(app, client, writer, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = Tokens(["someone-elses-key-0123456789"]).unsubscribe(ann.public_id, "news")
    response = post(client, writer, message(subject=f"unsubscribe-{token}"))
    assert response.json["action"] == "ignored"
    assert ledger.verdict_for(session, ann.email, "news").allowed


def test_without_a_token_only_a_dmarc_pass_from_our_host_counts(make_app):
    app = make_app(INBOUND_AUTHSERV_ID="mx.example.com")
    client = app.test_client()
    with app.app_context():
        from prefs.extensions import session as current

        make_topic(current(), "news")
        headers = bearer(make_key(current(), "write"))
    pass_ours = (
        "Authentication-Results: mx.example.com; spf=pass; dmarc=pass (p=reject) header.from=example.com\r\n"
    )
    pass_theirs = "Authentication-Results: evil.example; dmarc=pass header.from=example.com\r\n"
    fail_ours = "Authentication-Results: mx.example.com; dmarc=fail header.from=example.com\r\n"
    other_domain = "Authentication-Results: mx.example.com; dmarc=pass header.from=other.example\r\n"
    for extra in ("", pass_theirs, fail_ours, other_domain):
        response = post(client, headers, message(extra=extra))
        assert response.json["action"] == "ignored", extra
        assert "dmarc" in response.json["reason"]
    response = post(client, headers, message(extra=pass_ours))
    assert response.json == {"action": "unsubscribed", "scope": "all", "reason": "sender proven by DMARC"}
    with app.app_context():
        assert ledger.verdict_for(current(), "ann@example.com", "news").reason == "unsubscribed_all"


def test_malformed_messages_are_400(client, writer):
    for raw in (b"", b"\x00\x01\x02 not a message", b"no headers at all"):
        response = post(client, writer, raw)
        assert response.status_code == 400, raw
        assert response.json["error"]["code"] == "invalid_message"


def test_inbound_needs_rfc822(client, writer):
    assert (
        client.post("/api/v1/inbound", data=b"x", content_type="text/plain", headers=writer).status_code
        == 415
    )


def test_find_token_ignores_lookalikes():
    parsed = inbound.parse(message(subject="unsubscribe-short"))
    assert inbound.find_token(parsed, []) is None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_smtp_receiver_feeds_the_same_code(app, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = token_for(app, ann, "news")
    port = free_port()
    controller = receiver.start(app, "127.0.0.1", port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.sendmail("ann@example.com", [f"unsubscribe+{token}@example.com"], message(subject="stop"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            session.rollback()
            if not ledger.verdict_for(session, ann.email, "news").allowed:
                break
            time.sleep(0.05)
        assert ledger.verdict_for(session, ann.email, "news").reason == "unsubscribed"
    finally:
        controller.stop()
