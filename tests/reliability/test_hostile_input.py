"""Hostile input: forged tokens, odd addresses, escaping on every page, and abusive bodies."""

from __future__ import annotations

import io
import re
import string
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder, run_wsgi_app

from prefs.domain import ledger
from prefs.domain.tokens import Tokens
from prefs.extensions import db
from prefs.models import Event
from tests.factories import (
    bearer,
    make_key,
    make_subscriber,
    make_topic,
    preferences_token,
    unsubscribe_token,
)
from tests.reliability.figures import report

pytestmark = pytest.mark.reliability

ONE_CLICK = {"List-Unsubscribe": "One-Click"}
ALPHABET = string.ascii_letters + string.digits + "-_"
FIGURES: dict[str, int] = {}


def count(name: str, n: int = 1) -> None:
    FIGURES[name] = FIGURES.get(name, 0) + n


def state(session, email="ann@example.com"):
    """Return what may be sent to ann, and how many events are on file."""
    db.session.expire_all()
    return (
        [ledger.verdict_for(session, email, key).allowed for key in ("news", "transactional")],
        session.query(Event).count(),
    )


def refused_everywhere(client, token: str) -> None:
    """Every surface answers a bad token with a 4xx page, never a 5xx, never a change."""
    path = quote(token, safe="")
    for method, url, data in (
        ("POST", f"/u/{path}", ONE_CLICK),
        ("POST", f"/u/{path}", {"scope": "link"}),
        ("GET", f"/u/{path}", None),
        ("GET", f"/p/{path}", None),
        ("POST", f"/p/{path}", {"action": "leave-all"}),
    ):
        # a token with a slash in it is another path: werkzeug redirects // to /, then 4xx
        response = client.open(url, method=method, data=data, follow_redirects=True)
        count("tokens")
        assert 400 <= response.status_code < 500, (token[:80], method, url[:60], response.status_code)
        assert response.mimetype == "text/html"


@pytest.fixture
def ann(app, session):
    make_topic(session, "news")
    return make_subscriber(session, "ann@example.com")


def test_every_single_character_change_of_a_token_is_refused(app, session, client, ann):
    before = state(session)
    for good in (unsubscribe_token(ann, "news", "c1"), preferences_token(ann)):
        for position, char in enumerate(good):
            # the neighbour in the alphabet differs in the lowest bit only: base64's spare bits
            index = ALPHABET.find(char)
            for other in {ALPHABET[index ^ 1] if index >= 0 else "A", "." if char != "." else "A"}:
                refused_everywhere(client, good[:position] + other + good[position + 1 :])
    assert state(session) == before


def test_truncations_other_purposes_removed_keys_and_long_tokens_are_refused(app, session, client, ann):
    before = state(session)
    good = unsubscribe_token(ann, "news")
    removed = Tokens(["a-key-that-was-removed-0123456789"])
    for token in (
        *(good[:n] for n in range(1, len(good))),
        removed.unsubscribe(ann.public_id, "news"),
        removed.preferences(ann.public_id),
        "A" * 10_000,
        good + "A" * 10_000,
        good + "." + good,
    ):
        refused_everywhere(client, token)
    # a preferences token is no unsubscribe token
    response = client.post(f"/u/{preferences_token(ann)}", data=ONE_CLICK)
    count("tokens")
    assert response.status_code == 400
    assert state(session) == before


def test_random_tokens_are_refused(app, session, client, ann):
    before = state(session)

    # one app for every example: an app per example would hold a connection pool each
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw=st.one_of(st.binary(min_size=1, max_size=300), st.text(min_size=1, max_size=300)))
    def attempt(raw):
        refused_everywhere(client, raw.decode("latin-1") if isinstance(raw, bytes) else raw)
        assert state(session) == before

    attempt()


HOSTILE_ADDRESSES = [
    "a" * 64 + "@" + "b" * 250 + ".com",  # 320+ characters
    "x" * 330 + "@example.com",
    "ann@example.com\r\nBcc: victim@example.com",
    "ann@example.com\nX-Injected: 1",
    "ann\x00@example.com",
    "ann@exam\x00ple.com",
    "аnn@example.com",  # a Cyrillic look-alike  # noqa: RUF001
    "ann@exаmple.com",  # a look-alike domain  # noqa: RUF001
    '"ann smith"@example.com',
    '"<script>alert(1)</script>"@example.com',
    "ann@münchen.de",
    "ANN@XN--MNCHEN-3YA.DE",
    "ann'); DROP TABLE subscribers;--@example.com",
    "<script>alert(1)</script>@example.com",
    "ann@example.com<img src=x>",
    "ann+tag@example.com",
    "  Ann@Example.COM  ",
    "ann@@example.com",
    "",
]


def test_hostile_addresses_are_normalized_or_refused_per_item(app, session, client):
    make_topic(session, "news")
    key = bearer(make_key(session, "send", "write"))
    response = client.post(
        "/api/v1/check", json={"topic": "news", "recipients": HOSTILE_ADDRESSES}, headers=key
    )
    assert response.status_code in (200, 422), response.json
    if response.status_code == 422:  # empty strings are refused by the schema, per item
        assert set(response.json["error"]["fields"]["recipients"]) == {str(HOSTILE_ADDRESSES.index(""))}
        response = client.post(
            "/api/v1/check",
            json={"topic": "news", "recipients": [a for a in HOSTILE_ADDRESSES if a]},
            headers=key,
        )
    accepted = {}
    for result in response.json["results"]:
        count("addresses")
        if result["allowed"]:
            accepted[result["email"]] = result
            for value in result["headers"].values():
                assert not set(value) & {"\r", "\n", "\x00"}
            assert "<" not in result["unsubscribe_url"] and '"' not in result["unsubscribe_url"]
        else:
            assert result["reason"] == "invalid_address" and result["headers"] is None
    stored = {s.email for s in session.query(ledger.Subscriber)}
    for email in stored:
        assert email == email.strip().lower() and not set(email) & set("\r\n\x00<>'\"; ")
        assert len(email) <= 254
    # look-alikes are other addresses, IDN domains one address in two spellings, case folds
    assert {"ann+tag@example.com", "ann@xn--mnchen-3ya.de", "ann@example.com"} <= stored
    assert "аnn@example.com" in accepted  # noqa: RUF001 and ledger.find_subscriber(session, "ann@example.com") is not None
    assert len([e for e in stored if e.endswith("xn--mnchen-3ya.de")]) == 1
    # the events API refuses the same input item by item, never the whole batch
    events = [{"type": "unsubscribe", "email": a} for a in HOSTILE_ADDRESSES]
    response = client.post("/api/v1/events", json={"events": events}, headers=key)
    assert response.status_code == 200
    statuses = [r["status"] for r in response.json["results"]]
    assert len(statuses) == len(HOSTILE_ADDRESSES) and "error" in statuses and "accepted" in statuses


NASTY = "<b id=\"x\" onmouseover='alert(1)'>&amp;Evil</b>"


def test_every_page_that_shows_an_address_or_a_topic_escapes_it(app, session, client):
    topic = make_topic(session, "news", name=NASTY)
    make_topic(session, "other", name=NASTY + "2")
    from prefs.domain import topics as topic_service

    topic_service.update_topic(session, "news", description=NASTY)
    ann = make_subscriber(session, "ann@example.com")
    admin = make_key(session, "admin")
    basic = {"Authorization": "Basic " + __import__("base64").b64encode(f"ops:{admin}".encode()).decode()}
    link = unsubscribe_token(ann, "news")
    unsubscribed = client.post(f"/u/{link}", data={"scope": "link"})
    undo = re.search(r'name="undo" value="([^"]+)"', unsubscribed.get_data(as_text=True)).group(1)
    pages = {
        "unsubscribe page": client.get(f"/u/{link}"),
        "unsubscribed page": unsubscribed,
        "resubscribed page": client.post(f"/u/{link}", data={"action": "undo", "undo": undo}),
        "undo refused page": client.post(f"/u/{link}", data={"action": "undo", "undo": undo}),
        "preference center": client.get(f"/p/{preferences_token(ann)}"),
        "request form, invalid address": client.post("/unsubscribe", data={"email": NASTY}),
        "admin overview": client.get("/admin", headers=basic),
        "admin search, subscriber": client.post(
            "/admin/search", data={"email": "ann@example.com"}, headers=basic
        ),
        "admin search, invalid": client.post("/admin/search", data={"email": NASTY}, headers=basic),
    }
    assert topic.name == NASTY
    for name, response in pages.items():
        count("escaping")
        body = response.get_data(as_text=True)
        assert response.status_code < 500, name
        assert "<b id=" not in body and "onmouseover='" not in body, name
    shown = [n for n, r in pages.items() if "&lt;b id=" in r.get_data(as_text=True)]
    assert set(shown) >= {
        "unsubscribe page",
        "preference center",
        "request form, invalid address",
        "admin overview",
    }


class CountingStream(io.RawIOBase):
    """A request body that is never held: it counts what the server reads of it."""

    def __init__(self, size: int) -> None:
        self.size, self.read_bytes = size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = b"{" * n
        self.read_bytes += n
        return n


@pytest.mark.parametrize("path", ["/api/v1/check", "/api/v1/events", "/u/x", "/unsubscribe"])
def test_a_50_mb_body_is_413_without_being_read(app, client, session, path):
    key = bearer(make_key(session, "send", "write"))
    for announced in (True, False):
        body = CountingStream(50 * 1024 * 1024)
        kind = "application/json" if path.startswith("/api") else "application/x-www-form-urlencoded"
        environ = EnvironBuilder(path=path, method="POST", headers=key, content_type=kind).get_environ()
        environ["wsgi.input"] = body
        if announced:
            environ["CONTENT_LENGTH"] = str(body.size)
        else:  # streamed with no length, as a chunked upload arrives
            environ.pop("CONTENT_LENGTH", None)
            environ["HTTP_TRANSFER_ENCODING"] = "chunked"
            environ["wsgi.input_terminated"] = True  # gunicorn decodes the chunks
        _, status, _ = run_wsgi_app(app, environ, buffered=True)
        count("bodies")
        assert status.startswith("413"), (path, announced, status)
        # announced: nothing read; streamed: the limit (4 MiB) and werkzeug's read-ahead, not 50 MB
        assert body.read_bytes <= (0 if announced else 2 * app.config["MAX_BODY_BYTES"] + 1), body.read_bytes


def test_oversized_batches_bad_utf8_and_deep_json_are_refused(app, client, session):
    make_topic(session, "news")
    key = bearer(make_key(session, "send", "write"))
    too_many = [f"r{i}@example.com" for i in range(10_001)]
    response = client.post("/api/v1/check", json={"topic": "news", "recipients": too_many}, headers=key)
    assert response.status_code == 422 and "recipients" in response.json["error"]["fields"]
    for body in (
        b'{"topic": "news", "recipients": ["\xff\xfe@example.com"]}',
        b"\xc3\x28",
        "[" * 10_000 + "]" * 10_000,
    ):
        for path in ("/api/v1/check", "/api/v1/events"):
            response = client.post(path, data=body, content_type="application/json", headers=key)
            count("bodies")
            assert response.status_code == 400, (path, response.status_code)
            assert response.json["error"]["code"] == "malformed_json"
    deep = '{"topic": "news", "recipients": ' + "[" * 10_000 + "]" * 10_000 + "}"
    response = client.post("/api/v1/check", data=deep, content_type="application/json", headers=key)
    assert response.status_code == 400
    count("bodies", 2)


def test_zz_hostile_input_figures():
    """Report what the tests above tried (they run first, in file order)."""
    tried = sum(FIGURES.values())
    report(
        "hostile tokens, addresses, pages, bodies",
        tried,
        0,
        0,
        0,
        "hostile input: "
        + ", ".join(f"{n} {name}" for name, n in sorted(FIGURES.items()))
        + ": every one refused or normalized, 0 5xx, 0 state changes",
    )
    assert tried > 1000
