"""Requests by address: the form, the mailed link, and why it tells nobody who is on file."""

import logging
import time
from urllib.parse import urlsplit

import pytest
import redis

from prefs.domain import ledger, privacy
from prefs.extensions import limiter
from prefs.extensions import session as db_session
from prefs.models import ErasedAddress, Subscriber
from tests.factories import make_subscriber, make_topic, unsubscribe_token

KNOWN, UNKNOWN, ERASED = "ann@example.com", "amy@example.com", "abe@example.com"  # one mask: a***@example.com


def erase(session, email):
    """Erase an address as the API will: keep only its keyed fingerprint."""
    subscriber = make_subscriber(session, email)
    session.add(
        ErasedAddress(fingerprint=privacy.address_fingerprint(privacy.fingerprint_key(session), email))
    )
    session.delete(subscriber)
    session.commit()


@pytest.fixture
def mail_app(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, MAIL_FROM="Example <no-reply@example.com>", BRAND_NAME="Example")
    with app.app_context():
        s = db_session()
        make_topic(s, "news", name="Product news")
        make_subscriber(s, KNOWN)
        erase(s, ERASED)
    return app


def text_of(message):
    return message.get_body(("plain",)).get_content()


def test_the_form_asks_for_an_address(client):
    response = client.get("/unsubscribe")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert (
        '<label for="email">' in page and 'id="email" name="email"' in page and 'autocomplete="email"' in page
    )


def test_an_invalid_address_gets_the_form_again_and_no_mail(mail_app, smtp_server):
    response = mail_app.test_client().post("/unsubscribe", data={"email": "not an address"})
    page = response.get_data(as_text=True)
    assert response.status_code == 400
    assert 'aria-invalid="true"' in page and 'aria-describedby="email-error"' in page
    assert 'value="not an address"' in page
    assert smtp_server.inbox.messages == []


def test_a_known_address_is_mailed_its_link_and_the_link_opens_its_center(mail_app, smtp_server):
    client = mail_app.test_client()
    response = client.post("/unsubscribe", data={"email": " Ann@Example.COM "})
    assert response.status_code == 200
    assert "a***@example.com" in response.get_data(as_text=True)
    [message] = smtp_server.inbox.wait_for(1)
    assert message["To"] == KNOWN and message["From"] == "Example <no-reply@example.com>"
    assert message["Subject"] == "Your email preferences at Example"
    assert message.get_content_type() == "multipart/alternative"
    [link] = [w for w in text_of(message).split() if w.startswith("https://")]
    assert f'href="{link}"' in message.get_body(("html",)).get_content()
    parts = urlsplit(link)
    assert parts.netloc == "prefs.example.com" and parts.path.startswith("/p/")
    page = client.get(parts.path).get_data(as_text=True)
    assert "Email preferences" in page and "Product news" in page and "a***@example.com" in page


def test_known_unknown_and_erased_addresses_get_the_same_answer(mail_app, smtp_server):
    client = mail_app.test_client()
    answers = [client.post("/unsubscribe", data={"email": e}) for e in (KNOWN, UNKNOWN, ERASED)]
    assert len({a.status_code for a in answers}) == 1
    assert len({a.get_data() for a in answers}) == 1
    assert len({len(a.get_data()) for a in answers}) == 1
    assert len({tuple(sorted(k for k, _ in a.headers)) for a in answers}) == 1
    messages = smtp_server.inbox.wait_for(3)
    assert [m["To"] for m in messages] == [KNOWN, UNKNOWN, ERASED]
    assert "/p/" in text_of(messages[0]) and "/p/" in text_of(messages[1])
    # the erased address hears that it was erased, with no link, and is not brought back
    assert "/p/" not in text_of(messages[2]) and "erased" in text_of(messages[2])
    with mail_app.app_context():
        s = db_session()
        assert ledger.find_subscriber(s, UNKNOWN) is not None
        assert ledger.find_subscriber(s, ERASED) is None
        assert ledger.verdict_for(s, ERASED, "news").reason == "erased"


def test_a_new_address_the_database_cannot_add_gets_the_same_answer_and_a_note(
    mail_app, smtp_server, monkeypatch, caplog
):
    from prefs.domain import link_requests
    from prefs.errors import NotRecorded

    real = link_requests.public_id_for

    def full_disk(session, email):
        if email == UNKNOWN:  # only a new address needs the write
            raise NotRecorded("the new address could not be added") from OSError(28, "disk full")
        return real(session, email)

    monkeypatch.setattr(link_requests, "public_id_for", full_disk)
    caplog.set_level(logging.WARNING, logger="prefs.web.public")
    client = mail_app.test_client()
    answers = [client.post("/unsubscribe", data={"email": e}) for e in (KNOWN, UNKNOWN)]
    assert {a.status_code for a in answers} == {200}
    assert len({a.get_data() for a in answers}) == 1
    known, new = smtp_server.inbox.wait_for(2)
    assert "/p/" in text_of(known)
    assert "/p/" not in text_of(new) and "ask for it again" in text_of(new)
    assert new["Subject"] == known["Subject"]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("prefs")]
    assert any("could not be added" in line for line in lines)
    assert not any(UNKNOWN in line or KNOWN in line for line in lines)


def test_every_answer_takes_at_least_the_floor(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, REQUEST_MIN_SECONDS=0.4)
    client = app.test_client()
    for email in (KNOWN, UNKNOWN, ERASED):
        started = time.monotonic()
        assert client.post("/unsubscribe", data={"email": email}).status_code == 200
        assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    client.post("/unsubscribe", data={"email": "not an address"})
    assert time.monotonic() - started < 0.4  # a typo is told at once: it reveals nothing


def test_an_unknown_address_gets_a_working_link(mail_app, smtp_server):
    client = mail_app.test_client()
    client.post("/unsubscribe", data={"email": UNKNOWN})
    [message] = smtp_server.inbox.wait_for(1)
    path = urlsplit(next(w for w in text_of(message).split() if "/p/" in w)).path
    assert client.post(path, data={"action": "leave-all"}).status_code == 303
    with mail_app.app_context():
        assert ledger.verdict_for(db_session(), UNKNOWN, "news").reason == "unsubscribed_all"


def test_the_mail_speaks_the_pages_language(mail_app, smtp_server):
    mail_app.test_client().post("/unsubscribe?lang=fr", data={"email": KNOWN})
    [message] = smtp_server.inbox.wait_for(1)
    assert message["Subject"] == "Vos préférences e-mail chez Example"
    assert "Bonjour" in text_of(message)


def test_a_mail_server_that_is_down_is_a_503_page_alike_for_everyone(make_app):
    from tests.smtp import free_port

    app = make_app(SMTP_URL=f"smtp://127.0.0.1:{free_port()}", SMTP_TIMEOUT=2)
    with app.app_context():
        make_subscriber(db_session(), KNOWN)
    client = app.test_client()
    answers = [client.post("/unsubscribe", data={"email": e}) for e in (KNOWN, UNKNOWN)]
    assert [a.status_code for a in answers] == [503, 503]
    assert answers[0].get_data() == answers[1].get_data()
    assert answers[0].headers["Retry-After"] == "60"
    assert "We could not send the email" in answers[0].get_data(as_text=True)


def test_no_log_line_holds_an_address_or_a_whole_token(make_app, caplog):
    caplog.set_level(logging.DEBUG)
    app = make_app()  # no SMTP server: the message goes to the log
    with app.app_context():
        s = db_session()
        make_topic(s, "news")
        subscriber = make_subscriber(s, KNOWN)
        erase(s, ERASED)
        token = unsubscribe_token(subscriber, "news")
    client = app.test_client()
    for email in (KNOWN, UNKNOWN, ERASED, "bad@@example.com"):
        client.post("/unsubscribe", data={"email": email})
    client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    client.get(f"/u/{token}")
    assert "written to the log" in caplog.text and "a***@example.com" in caplog.text
    for secret in (KNOWN, UNKNOWN, ERASED, "bad@@example.com", token):
        assert secret not in caplog.text
    assert "/p/" in caplog.text  # the message body is there, with its token cut short
    with app.app_context():
        s = db_session()
        public_ids = [p for (p,) in s.query(Subscriber.public_id)]
    for record in caplog.records:
        message = record.getMessage()
        for public_id in public_ids:
            assert public_id + "." not in message  # no whole token of anyone's


def test_requests_are_limited_per_client(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, RATELIMIT_PER_CLIENT="2 per minute")
    client = app.test_client()
    answers = [client.post("/unsubscribe", data={"email": f"p{i}@example.com"}) for i in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    limited = answers[2]
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert "Please wait a little" in limited.get_data(as_text=True)
    assert len(smtp_server.inbox.wait_for(2)) == 2
    other = client.post(
        "/unsubscribe", data={"email": "p9@example.com"}, environ_base={"REMOTE_ADDR": "10.9.9.9"}
    )
    assert other.status_code == 200


def test_requests_are_limited_per_address_whatever_the_client(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, RATELIMIT_PER_ADDRESS="1 per minute")
    client = app.test_client()

    def post(email, ip):
        return client.post(
            "/unsubscribe", data={"email": email}, environ_base={"REMOTE_ADDR": ip}
        ).status_code

    assert post(KNOWN, "10.0.0.1") == 200
    assert post("ANN@example.com", "10.0.0.2") == 429  # the same address, normalized
    assert post(UNKNOWN, "10.0.0.3") == 200
    assert [post("not an address", "10.0.0.4") for _ in range(3)] == [400, 400, 400]
    assert len(smtp_server.inbox.wait_for(2)) == 2
    with app.app_context():
        keys = " ".join(limiter.storage.storage)  # memory storage: the counters' keys
    assert "address:" in keys and "@" not in keys and "ann" not in keys.lower()


def test_the_per_address_limit_counts_the_mailbox_not_its_spellings(make_app, smtp_server):
    app = make_app(
        SMTP_URL=smtp_server.url, RATELIMIT_PER_ADDRESS="3 per hour", RATELIMIT_PER_CLIENT="100 per hour"
    )
    client = app.test_client()

    def post(email, n):
        ip = {"REMOTE_ADDR": f"10.0.{n}.1"}
        return client.post("/unsubscribe", data={"email": email}, environ_base=ip).status_code

    spellings = [f"target+{n}@example.com" for n in range(1, 26)] + [
        "Target@Example.COM",
        "TARGET+x@example.com",
    ]
    statuses = [post(email, n) for n, email in enumerate(spellings)]
    assert statuses.count(200) == 3, statuses
    # Gmail delivers with the dots left out, and googlemail.com is gmail.com
    gmail = ["t.a.r.g.e.t@gmail.com", "target+1@googlemail.com", "tar.get+x@gmail.com", "TARGET@gmail.com"]
    assert [post(email, 100 + n) for n, email in enumerate(gmail)] == [200, 200, 200, 429]
    # elsewhere a dot makes another mailbox
    assert post("t.arget@example.com", 200) == 200
    assert len(smtp_server.inbox.wait_for(7)) == 7


@pytest.fixture
def redis_db():
    """Return an empty Redis database of its own on 127.0.0.1, emptied again afterwards."""
    url = "redis://127.0.0.1:6379/13"
    store = redis.Redis.from_url(url)
    store.flushdb()
    yield url, store
    store.flushdb()
    store.close()


def test_hosts_sharing_redis_share_the_limits(make_app, redis_db):
    url, store = redis_db
    settings = {"RATELIMIT_STORAGE_URI": url, "RATELIMIT_PER_ADDRESS": "1 per minute"}
    first = make_app(**settings)
    assert first.test_client().post("/unsubscribe", data={"email": KNOWN}).status_code == 200
    # another host: an app of its own, whose limiter storage starts with nothing in memory
    second = make_app(**settings)
    assert second.test_client().post("/unsubscribe", data={"email": KNOWN}).status_code == 429
    keys = [k.decode() for k in store.keys("*")]
    assert any("request-address" in k for k in keys)
    assert not any("@" in k or "ann" in k for k in keys)


def test_memory_storage_is_per_host(make_app):
    settings = {"RATELIMIT_STORAGE_URI": "memory://", "RATELIMIT_PER_ADDRESS": "1 per minute"}
    assert make_app(**settings).test_client().post("/unsubscribe", data={"email": KNOWN}).status_code == 200
    assert make_app(**settings).test_client().post("/unsubscribe", data={"email": KNOWN}).status_code == 200


def test_a_limiter_storage_outage_lets_requests_through(make_app, caplog):
    from tests.smtp import free_port

    app = make_app(
        RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}", RATELIMIT_ONE_CLICK="1 per minute"
    )
    with app.app_context():
        s = db_session()
        make_topic(s, "news")
        token = unsubscribe_token(make_subscriber(s, KNOWN), "news")
    client = app.test_client()
    for _ in range(2):
        assert client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert client.post("/unsubscribe", data={"email": KNOWN}).status_code == 200


def test_behind_a_trusted_proxy_each_client_has_its_own_limit(make_app):
    app = make_app(TRUSTED_PROXIES=1, RATELIMIT_PER_CLIENT="1 per minute")
    client = app.test_client()

    def post(forwarded_for):
        headers = {"X-Forwarded-For": forwarded_for}
        return client.post(
            "/unsubscribe", data={"email": KNOWN}, headers=headers, environ_base={"REMOTE_ADDR": "10.0.0.1"}
        ).status_code

    assert [post("198.51.100.1"), post("198.51.100.2"), post("198.51.100.1")] == [200, 200, 429]


def test_without_trusted_proxies_forwarded_headers_are_ignored(make_app):
    app = make_app(RATELIMIT_PER_CLIENT="1 per minute")
    client = app.test_client()
    codes = [
        client.post("/unsubscribe", data={"email": KNOWN}, headers={"X-Forwarded-For": ip}).status_code
        for ip in ("198.51.100.1", "198.51.100.2")
    ]
    assert codes == [200, 429]  # a client cannot pick its own address


def test_an_ipv6_client_is_counted_by_its_64_not_by_each_address_it_picks(make_app, smtp_server):
    app = make_app(SMTP_URL=smtp_server.url, RATELIMIT_PER_CLIENT="2 per minute")
    client = app.test_client()

    def post(ip, n):
        return client.post(
            "/unsubscribe", data={"email": f"v6-{n}@example.com"}, environ_base={"REMOTE_ADDR": ip}
        ).status_code

    picked = ["2001:db8:1:2::1", "2001:db8:1:2::ffff", "2001:db8:1:2:abcd::9"]
    assert [post(ip, n) for n, ip in enumerate(picked)] == [200, 200, 429]
    assert post("2001:db8:1:3::1", 9) == 200  # another /64, another client
