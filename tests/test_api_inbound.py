"""POST /api/v1/inbound under attack: forged results prove nothing, hostile messages answer fast."""

import time

import pytest

from prefs.domain import ledger
from tests.factories import bearer, make_key, make_topic
from tests.test_smtpd import dkim_key  # noqa: F401 (a fixture)

OURS = "mx.prefs.example"
RECEIVED = f"Received: from mail.evil.example (mail.evil.example [192.0.2.66]) by {OURS} (Postfix) id 4Qx"
AR = f"Authentication-Results: {OURS};"
FAIL = f"{AR} dmarc=fail (p=reject) header.from=victim.example"
FAILING = f"{AR} dmarc=fail header.from=victim.example; spf=pass smtp.mailfrom="


@pytest.fixture
def api(make_app):
    app = make_app(INBOUND_AUTHSERV_ID=OURS)
    with app.app_context():
        from prefs.extensions import session

        make_topic(session(), "news")
        headers = bearer(make_key(session(), "write"))
    client = app.test_client()

    def post(raw):
        return client.post("/api/v1/inbound", data=raw, content_type="message/rfc822", headers=headers)

    def victim_allowed():
        with app.app_context():
            from prefs.extensions import session

            return ledger.verdict_for(session(), "victim@victim.example", "news").allowed

    post.victim_allowed = victim_allowed
    return post


def message(top, sender="victim@victim.example", headers="", body="Please stop.\r\n"):
    return (
        f"{top}From: {sender}\r\nTo: unsubscribe@prefs.example\r\nSubject: stop\r\n{headers}\r\n{body}"
    ).encode()


ATTACKS = {
    "a forged pass below our fail": message(
        f"{FAIL}\r\n{RECEIVED}\r\nAuthentication-Results: {OURS}; dmarc=pass header.from=victim.example\r\n"
    ),
    "dmarc=pass in a quoted string": message(f'{FAILING}"x;dmarc=pass"@evil.example\r\n{RECEIVED}\r\n'),
    "dmarc=pass in a comment": message(f"{FAILING}x(;dmarc=pass)@evil.example\r\n{RECEIVED}\r\n"),
    "an encoded word": message(
        f"Authentication-Results: =?us-ascii?q?mx=2Eprefs=2Eexample=3B_dmarc=3Dpass?=\r\n{RECEIVED}\r\n"
    ),
    "a pass for another domain": message(
        f"{AR} dmarc=pass (p=reject; sp=none) header.from=evil.example\r\n{RECEIVED}\r\n"
    ),
}


@pytest.mark.parametrize("raw", ATTACKS.values(), ids=ATTACKS.keys())
def test_forged_results_unsubscribe_nobody(api, raw):
    response = api(raw)
    assert response.status_code == 200
    assert response.json["action"] == "ignored"
    assert api.victim_allowed()


def test_our_own_pass_still_unsubscribes(api):
    pass_ours = f"Authentication-Results: {OURS}; dmarc=pass header.from=victim.example\r\n{RECEIVED}\r\n"
    response = api(message(pass_ours))
    assert response.json == {"action": "unsubscribed", "scope": "all", "reason": "sender proven by DMARC"}
    assert not api.victim_allowed()


def addresses(n):
    return ", ".join(f"user{i}@example.com" for i in range(n))


HOSTILE = {
    "a To of 40,000 addresses": message("", headers=f"To: {addresses(40_000)}\r\n"),
    "a To folded over 20,000 lines (350 KB)": message(
        "", headers="To: " + "\r\n ".join(f"user{i}@example.com," for i in range(20_000)) + "\r\n"
    ),
    "2 KB of nested comments in From": message("", sender="(" * 2000 + "victim@victim.example"),
    "nested comments in our results": message(
        f"Authentication-Results: {OURS}; dmarc=pass {'(' * 2000} header.from=victim.example\r\n"
    ),
    "780 KB of encoded words in the Subject": message(
        "", headers="Subject: " + " ".join(["=?utf-8?q?abc?="] * 48_000) + "\r\n"
    ),
    "400 KB of quotes in To": message("", headers="To: " + '"a' * 200_000 + "\r\n"),
    "100,000 header fields": message("", headers="X-A: b\r\n" * 100_000),
    "600 short header fields": message("", headers="X-A: b\r\n" * 600),
    "a To of 2,000 short addresses": message("", headers="To: " + "a@b," * 1000 + "\r\n"),
    "a 4 KB From of quotes": message("", sender='"' * 4000),
    "a Subject of 4,100 characters": message("", headers="Subject: " + "x" * 4100 + "\r\n"),
    "a message over 1 MiB": message("", body="x" * 1100 * 1024),
    "one line of 1 MiB with no line break": b"From: " + b"a" * (1024 * 1024 - 10),
    "nothing but line breaks": b"\r\n" * 400_000,
    "a header section without a blank line, 200 KB": b"X-A: " + b"b" * 200_000,
    "groups nested 1,200 deep in To": message("", headers="To: " + "a:" * 1200 + ";" * 1200 + "\r\n"),
    "groups nested 1,000 deep in From": message("", sender="a: " * 1000 + "victim@victim.example"),
    "colons only in To": message("", headers="To: " + ":" * 4000 + "\r\n"),
    "bare carriage returns": b"From: victim@victim.example\rTo: x@y.example\r" * 5000,
}


@pytest.mark.parametrize("raw", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_messages_answer_at_once_with_a_4xx(api, raw):
    started = time.monotonic()
    response = api(raw)
    elapsed = time.monotonic() - started
    assert elapsed < 2, elapsed
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.status_code
    if response.status_code != 200:
        assert set(response.json["error"]) >= {"code", "message"}
    assert api.victim_allowed()


def test_ordinary_odd_messages_are_read(api):
    odd = {
        "8-bit body": message("", body="Bitte abmelden. \u00e4\u00f6\u00fc\r\n"),
        "non-ASCII display name": message("", sender="Vict\u00f6r <victim@victim.example>"),
        "bare line feeds": b"From: victim@victim.example\nTo: unsubscribe@prefs.example\nSubject: x\n\nbye\n",
        "headers only": b"From: victim@victim.example\r\nSubject: stop\r\n",
    }
    for name, raw in odd.items():
        response = api(raw)
        assert response.status_code == 200, name
        assert response.json["action"] == "ignored", name


# one header section, two readings: a bare CR or LF ends a line for the stdlib's parser but not
# for dkimpy's or an MTA's (CRLF only), and a NUL ends a C string in a milter
SMUGGLED = {
    "results after a bare CR": message("", headers=f"X-A: b\r{AR} dmarc=pass header.from=victim.example\r\n"),
    "a From after a bare CR": message("", sender="mallory@evil.example\rFrom: victim@victim.example"),
    "a To after a bare LF": message("", headers="X-A: b\nTo: unsubscribe@prefs.example\r\n"),
    "a NUL in From": message("", sender="victim@victim.example\x00mallory@evil.example"),
    "a lone CR before the blank line": message("", headers="X-A: b\r\r\n"),
}


@pytest.mark.parametrize("raw", SMUGGLED.values(), ids=SMUGGLED.keys())
def test_a_header_section_with_two_readings_is_refused(api, raw):
    response = api(raw)
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "invalid_message"
    assert api.victim_allowed()


# our MTA verified a genuine DKIM signature: DMARC passed, but the message may be a replay


@pytest.fixture
def mailbox_api(make_app):
    app = make_app(INBOUND_AUTHSERV_ID=OURS, UNSUBSCRIBE_MAILTO="unsubscribe@prefs.example")
    with app.app_context():
        from prefs.extensions import session

        make_topic(session(), "news")
        headers = bearer(make_key(session(), "write"))
    client = app.test_client()

    def post(raw):
        response = client.post("/api/v1/inbound", data=raw, content_type="message/rfc822", headers=headers)
        with app.app_context():
            from prefs.extensions import session

            return response, ledger.verdict_for(session(), "victim@victim.example", "news").allowed

    return post


VERIFIED = f"{AR} dkim=pass header.d=victim.example; dmarc=pass header.from=victim.example\r\n{RECEIVED}\r\n"


@pytest.mark.parametrize("name", ["sent to someone else", "To not signed", "a body length tag (l=)"])
def test_a_replay_our_mta_verified_proves_nothing(mailbox_api, dkim_key, name):  # noqa: F811
    from tests.test_smtpd import REPLAYS

    raw = VERIFIED.encode() + REPLAYS[name](dkim_key[0])
    response, allowed = mailbox_api(raw)
    assert response.status_code == 200
    assert response.json["action"] == "ignored", response.json
    assert allowed


def test_a_fresh_signature_to_our_mailbox_our_mta_verified_proves(mailbox_api, dkim_key):  # noqa: F811
    from tests.test_smtpd import raw_message, signed_with

    response, allowed = mailbox_api(VERIFIED.encode() + signed_with(raw_message(), dkim_key[0]))
    assert response.json["action"] == "unsubscribed", response.json
    assert not allowed


def test_an_aligned_spf_pass_needs_no_signature_check(mailbox_api, dkim_key):  # noqa: F811
    from tests.test_smtpd import REPLAYS

    spf = f"{AR} spf=pass smtp.mailfrom=bounce@victim.example; dmarc=pass header.from=victim.example\r\n"
    replay = REPLAYS["sent to someone else"](dkim_key[0])
    response, allowed = mailbox_api((spf + RECEIVED + "\r\n").encode() + replay)
    assert response.json["action"] == "unsubscribed", response.json
    assert not allowed
