"""Mail to the unsubscribe address: by token, by proven sender, and nothing else."""

import smtplib
import socket
import time

import pytest

from prefs.domain import inbound, ledger
from prefs.domain.tokens import Tokens
from prefs.mail import smtpd as receiver
from tests.factories import bearer, make_key, make_subscriber, make_topic


@pytest.fixture
def writer(session):
    return bearer(make_key(session, "write"))


def message(subject="unsubscribe", sender="Ann <ann@example.com>", to="unsubscribe@example.com", extra=""):
    """A message; ``extra`` is what the boundary MTA put on top."""
    return (
        f"{extra}From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
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


def test_the_smtp_receiver_feeds_the_same_code(make_app):
    app = make_app(UNSUBSCRIBE_MAILTO="unsubscribe@example.com")
    with app.app_context():
        from prefs.extensions import session as current

        session = current()
        make_topic(session, "news")
        ann = make_subscriber(session)
        token = token_for(app, ann, "news")
        port = free_port()
        running = receiver.start(app, "127.0.0.1", port)
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.sendmail(
                    "ann@example.com", [f"unsubscribe+{token}@example.com"], message(subject="stop")
                )
            # the receiver answers once the change is committed
            session.rollback()
            assert ledger.verdict_for(session, ann.email, "news").reason == "unsubscribed"
        finally:
            running.stop()


# the DMARC gate: only what our own boundary MTA wrote proves a sender

OURS = "mx.prefs.example"
RECEIVED = (
    "Received: from mail.victim.example (mail.victim.example [192.0.2.10])\r\n"
    f"\tby {OURS} (Postfix) with ESMTPS id 4QxZy1; Tue, 1 Dec 2026 10:00:00 +0000"
)


def ar(value, ours=OURS):
    return f"Authentication-Results: {ours}; {value}" if ours else f"Authentication-Results: {value}"


def mail(*top, sender="Victim <victim@victim.example>", below=(), subject="please stop"):
    """A message to the unsubscribe mailbox: ``top`` is what the boundary MTA put above it."""
    lines = [
        *top,
        # the shape of a signature made for us: over From and To, made now (our MTA verified it)
        f"DKIM-Signature: v=1; a=rsa-sha256; d=victim.example; s=s1; t={int(time.time())};"
        " h=from:to:subject; bh=x; b=y",
        f"From: {sender}",
        "To: unsubscribe@prefs.example",
        f"Subject: {subject}",
        *below,
        "Message-ID: <1@victim.example>",
    ]
    return ("\r\n".join(lines) + "\r\n\r\nPlease stop.\r\n").encode()


def decide(app, session, raw, authserv_id=OURS):
    make_topic(session, "news")
    outcome = inbound.handle(
        session, app.extensions["prefs.tokens"], raw, [], authserv_id, mailbox="unsubscribe@prefs.example"
    )
    session.rollback()
    return outcome, ledger.verdict_for(session, "victim@victim.example", "news").allowed


PASS = "dmarc=pass (p=reject dis=none) header.from=victim.example"
FORGERIES = {
    "a forged pass below our fail": mail(
        ar("dmarc=fail (p=reject) header.from=victim.example"), RECEIVED, ar(PASS)
    ),
    "a forged pass right under our fail": mail(
        RECEIVED, ar("dmarc=fail header.from=victim.example"), ar(PASS)
    ),
    "dmarc=pass in a quoted string": mail(
        ar('dmarc=fail header.from=victim.example; spf=pass smtp.mailfrom="x;dmarc=pass"@evil.example'),
        RECEIVED,
    ),
    "dmarc=pass in a comment": mail(
        ar("dmarc=fail header.from=victim.example; spf=pass smtp.mailfrom=x@evil.example (;dmarc=pass)"),
        RECEIVED,
    ),
    "an encoded word": mail(
        "Authentication-Results: =?us-ascii?q?mx=2Eprefs=2Eexample=3B_dmarc=3Dpass?=", RECEIVED
    ),
    "an encoded word after our id": mail(ar("=?us-ascii?q?dmarc=3Dpass?="), RECEIVED),
    "a pass for another domain behind a comment": mail(
        ar("dmarc=pass (p=reject; sp=none) header.from=evil.example"), RECEIVED
    ),
    "a pass without header.from": mail(ar("dmarc=pass"), RECEIVED),
    "a pass with header.d only": mail(ar("dmarc=pass header.d=victim.example"), RECEIVED),
    "a pass with header.i only": mail(ar("dmarc=pass header.i=@victim.example"), RECEIVED),
    "a pass naming two domains": mail(
        ar("dmarc=pass header.from=victim.example header.from=evil.example"), RECEIVED
    ),
    "a pass for a parent domain": mail(ar("dmarc=pass header.from=example"), RECEIVED),
    "our id below the sender's own headers": mail(RECEIVED, below=[ar(PASS)]),
    "our id below the Received of the hop before ours": mail(
        RECEIVED,
        ar("dmarc=fail header.from=victim.example"),
        "Received: from x by mail.victim.example; Tue, 1 Dec 2026 09:59:00 +0000",
        ar(PASS),
    ),
    "our id below another host's results": mail(
        RECEIVED, ar("dmarc=fail", ours="mx.other.example"), ar(PASS)
    ),
    "a pass and a fail from our id": mail(ar(PASS), ar("dmarc=fail header.from=victim.example"), RECEIVED),
    "a pass from our id in an unknown version": mail(f"Authentication-Results: {OURS} 2; {PASS}", RECEIVED),
    "a pass from another host": mail(RECEIVED, ar(PASS, ours="mx.google.com")),
    "a pass from a host whose id merely starts like ours": mail(
        ar(PASS, ours=OURS + ".evil.example"), RECEIVED
    ),
    "our id, but unreadable": mail(ar(PASS + "; spf=pass smtp.mailfrom=@@@"), RECEIVED),
    "a pass beside a second From header": mail(
        ar(PASS), RECEIVED, sender="Victim <victim@victim.example>\r\nFrom: mallory@victim.example"
    ),
    "a pass for a From of two addresses": mail(
        ar(PASS), RECEIVED, sender="victim@victim.example, mallory@victim.example"
    ),
    "a pass for a From in an encoded word": mail(
        ar(PASS), RECEIVED, sender="=?utf-8?q?victim=40victim.example?="
    ),
    "our id in capitals and folded, below the sender's headers": mail(
        RECEIVED, below=[f"AUTHENTICATION-RESULTS:\r\n {OURS.upper()};\r\n\t{PASS}"]
    ),
    "our id with a header.from in a U-label": mail(
        ar("dmarc=pass header.from=v\u00efctim.example"), RECEIVED
    ),
    "our id after a comment naming another": mail(
        f"Authentication-Results: (mx.other.example) {OURS}; dmarc=fail header.from=victim.example",
        RECEIVED,
        ar(PASS),
    ),
    "another host's id after a comment naming ours": mail(
        f"Authentication-Results: ({OURS}) mx.other.example; {PASS}", RECEIVED
    ),
    "a quoted header.from for another domain": mail(ar('dmarc=pass header.from="evil.example"'), RECEIVED),
    "a result named dmarc in another case, failing": mail(
        ar(PASS), ar("DMARC=Fail header.from=victim.example"), RECEIVED
    ),
    "a pass with a From of obsolete syntax beside it": mail(
        ar(PASS), RECEIVED, sender="mallory@victim.example\r\nFrom : victim@victim.example"
    ),
}


@pytest.mark.parametrize("raw", FORGERIES.values(), ids=FORGERIES.keys())
def test_no_forged_or_unclear_result_proves_a_sender(app, session, raw):
    outcome, allowed = decide(app, session, raw)
    assert outcome.action == "ignored"
    assert allowed


GENUINE = {
    "results above our Received (milter at index 0)": mail(ar(PASS), RECEIVED),
    "results below our Received (milter at index 1)": mail(RECEIVED, ar(PASS)),
    "local delivery's headers on top": mail(
        "Return-Path: <bounce@victim.example>",
        "Delivered-To: unsubscribe@prefs.example",
        "X-Original-To: unsubscribe@prefs.example",
        RECEIVED,
        ar("dkim=pass header.d=victim.example"),
        ar(PASS),
    ),
    "our id in another case, folded, with comments and a version": mail(
        f"Authentication-Results: {OURS.upper()} 1 (our border);\r\n"
        "\tspf=pass (sender SPF authorized; p=1) smtp.mailfrom=bounce@victim.example;\r\n"
        "\tdkim=pass (2048-bit key) header.d=victim.example header.i=@victim.example;\r\n"
        "\tdmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=Victim.Example.",
        RECEIVED,
    ),
    "another host's failing results below ours": mail(
        ar(PASS), RECEIVED, ar("dmarc=fail header.from=victim.example", ours="mx.google.com")
    ),
}


@pytest.mark.parametrize("raw", GENUINE.values(), ids=GENUINE.keys())
def test_our_own_boundary_pass_proves_the_sender(app, session, raw):
    outcome, allowed = decide(app, session, raw)
    assert (outcome.action, outcome.scope) == ("unsubscribed", "all")
    assert not allowed


def test_an_international_from_domain_matches_its_a_label(app, session):
    make_topic(session, "news")
    raw = (
        f"Authentication-Results: {OURS}; dmarc=pass header.from=xn--bcher-kva.example\r\n{RECEIVED}\r\n"
        "From: Anna <anna@b\u00fccher.example>\r\nTo: unsubscribe@prefs.example\r\n"
        "Subject: stop\r\n\r\nbye\r\n"
    ).encode()
    outcome = inbound.handle(session, app.extensions["prefs.tokens"], raw, [], OURS)
    assert outcome.action == "unsubscribed"
    assert ledger.verdict_for(session, "anna@xn--bcher-kva.example", "news").reason == "unsubscribed_all"


def test_without_an_authserv_id_no_result_counts(app, session):
    outcome, allowed = decide(app, session, mail(ar(PASS), RECEIVED), authserv_id=None)
    assert outcome.action == "ignored" and allowed


def test_a_display_name_that_looks_like_an_address_changes_only_the_real_one(app, session):
    raw = mail(
        ar("dmarc=pass header.from=evil.example"),
        RECEIVED,
        sender='"victim@victim.example" <mallory@evil.example>',
    )
    outcome, allowed = decide(app, session, raw)
    assert outcome.action == "unsubscribed"
    assert allowed
    assert ledger.verdict_for(session, "mallory@evil.example", "news").reason == "unsubscribed_all"


def test_a_token_in_an_encoded_subject_is_found(app, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = token_for(app, ann, "news")
    encoded = "=?utf-8?q?" + f"unsubscribe-{token}".replace("_", "=5F") + "?="
    outcome = inbound.handle(session, app.extensions["prefs.tokens"], message(subject=encoded), [], None)
    assert (outcome.action, outcome.scope) == ("unsubscribed", "news")


def test_a_token_in_the_delivery_headers_decides_whatever_the_to_holds(app, client, writer, session):
    # Delivered-To and X-Original-To are the envelope recipient, written by our own MTA
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = token_for(app, ann, "news")
    crowd = ", ".join(f"user{i}@example.com" for i in range(60))
    for name in ("X-Original-To", "Delivered-To"):
        raw = message(subject="bye", to=crowd, extra=f"{name}: unsubscribe+{token}@example.com\r\n")
        response = post(client, writer, raw)
        assert response.status_code == 200, (name, response.json)
        assert response.json["action"] in ("unsubscribed", "already_unsubscribed"), name
    assert ledger.verdict_for(session, ann.email, "news").reason == "unsubscribed"


def test_a_token_in_the_delivery_headers_decides_whatever_the_subject_holds(app, client, writer, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    token = token_for(app, ann, "news")
    raw = message(subject="x" * 5000, extra=f"X-Original-To: unsubscribe+{token}@example.com\r\n")
    response = post(client, writer, raw)
    assert response.status_code == 200, response.json
    assert ledger.verdict_for(session, ann.email, "news").reason == "unsubscribed"
