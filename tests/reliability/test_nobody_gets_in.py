"""Nobody gets in, and nobody learns who is on file: raw tables, logs, pages, timing, keys."""

from __future__ import annotations

import io
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from prefs.domain.tokens import Tokens
from prefs.extensions import db
from prefs.ops import logs
from tests.factories import (
    bearer,
    make_key,
    make_subscriber,
    make_topic,
    preferences_token,
    unsubscribe_token,
)
from tests.reliability.figures import report
from tests.reliability.harness import free_port, request, wait_until

pytestmark = pytest.mark.reliability

CLIENT_IP = "203.0.113.77"
PROXIED_IP = "198.51.100.23"
KNOWN = ["ann@example.com", "bob.smith+news@example.org", "carol@example.net"]
UNKNOWN = "zed@example.com"
ONE_CLICK = {"List-Unsubscribe": "One-Click"}
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[a-z]{2,}")


def full_flow(app, session, client):
    """Use every page and API call with known addresses; return every response and the secrets."""
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    people = [make_subscriber(session, a) for a in KNOWN]
    keys = {
        scope: make_key(session, scope, name=f"flow-{scope}") for scope in ("send", "read", "write", "admin")
    }
    tokens = [unsubscribe_token(p, "news", "c1") for p in people] + [preferences_token(p) for p in people]
    env = {"REMOTE_ADDR": "127.0.0.1"}
    headers = {"X-Forwarded-For": f"{PROXIED_IP}", "User-Agent": "flow-test"}
    responses = []

    def call(method, path, **kwargs):
        kwargs.setdefault("headers", {})
        kwargs["headers"] = {**headers, **kwargs["headers"]}
        response = client.open(
            path, method=method, environ_base={**env, **kwargs.pop("environ", {})}, **kwargs
        )
        responses.append((method, path, response))
        assert response.status_code < 500, (method, path, response.status_code)
        return response

    ann, bob, carol = people
    call("GET", f"/u/{tokens[0]}")
    call("POST", f"/u/{tokens[0]}", data=ONE_CLICK)
    call("POST", f"/u/{tokens[1]}", data={"scope": "all"})
    call("POST", f"/u/{tokens[1]}", data={"action": "undo", "scope": "all"})
    call("GET", f"/p/{tokens[3]}")
    call("POST", f"/p/{tokens[4]}", data={"action": "save", "topic": "events"})
    call("POST", f"/p/{tokens[5]}", data={"action": "leave-all"})
    for email in (*KNOWN, UNKNOWN, "not an address"):
        call("POST", "/unsubscribe", data={"email": email}, environ={"REMOTE_ADDR": CLIENT_IP})
    call("GET", "/u/" + tokens[0][:-3])  # error pages: a cut link, a forged one, a lost page
    call("GET", "/p/" + tokens[3][:-1] + "x")
    call("GET", "/no/such/page")
    api = {k: bearer(v) for k, v in keys.items()}
    call(
        "POST", "/api/v1/check", json={"topic": "news", "recipients": [*KNOWN, UNKNOWN]}, headers=api["send"]
    )
    events = [{"type": "complaint", "email": carol.email}, {"type": "unsubscribe", "email": bob.email}]
    call("POST", "/api/v1/events", json={"events": events}, headers=api["write"])
    call("GET", "/api/v1/suppressions", headers=api["read"])
    call("GET", "/api/v1/changes", headers=api["read"])
    call("GET", f"/api/v1/subscribers/{ann.email}", headers=api["admin"])
    call("GET", f"/api/v1/subscribers/{UNKNOWN}", headers=api["admin"])
    call("POST", "/api/v1/check", json={"topic": "nope", "recipients": KNOWN}, headers=api["send"])
    call("GET", "/api/v1/topics", headers={"Authorization": "Bearer prefs_wrong-key-0123456789"})
    call("DELETE", f"/api/v1/subscribers/{carol.email}", headers=api["admin"])
    return responses, keys, tokens


def test_the_database_holds_no_key_and_no_ip_after_a_full_run(make_app):
    app = make_app(TRUSTED_PROXIES=1)
    with app.app_context():
        responses, keys, _ = full_flow(app, db.session(), app.test_client())
        with db.engine.connect() as conn:
            dump = "\n".join(
                repr(conn.execute(text(f'SELECT * FROM "{table}"')).all())
                for table in inspect(conn).get_table_names()
            )
    assert dump.count("flow-") == 4  # the keys' names are there, so the dump is real
    for secret in keys.values():
        assert secret not in dump and secret.removeprefix("prefs_") not in dump
    for ip in (CLIENT_IP, PROXIED_IP, "127.0.0.1"):
        assert ip not in dump
    report(
        "raw tables after a full run",
        len(responses),
        sum(1 for *_, r in responses if r.status_code < 400),
        0,
        0,
        f"raw tables: {len(responses)} requests, then 0 API keys and 0 IP addresses "
        f"in {dump.count(chr(10)) + 1} tables",
    )


def test_no_log_line_url_or_error_page_holds_an_address_or_a_whole_token(make_app):
    app = make_app(
        TRUSTED_PROXIES=1, RATELIMIT_PER_ADDRESS="100 per hour", RATELIMIT_PER_CLIENT="100 per hour"
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with app.app_context():
            responses, keys, tokens = full_flow(app, db.session(), app.test_client())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    written = stream.getvalue()
    assert '"route":"/u/[token]"' in written  # the request lines are there (the pattern, masked too)
    emails = [*KNOWN, UNKNOWN]
    for secret in (*emails, *tokens, *keys.values()):
        assert secret not in written
    urls, error_pages = [], 0
    for method, path, response in responses:
        body = response.get_data(as_text=True)
        urls += [response.headers.get("Location", ""), *re.findall(r'(?:href|action|src)="([^"]*)"', body)]
        urls += re.findall(r'"(?:unsubscribe|preferences)_url": ?"([^"]*)"', body)
        if response.status_code >= 400:
            error_pages += 1
            for secret in (*emails, *tokens):
                assert secret not in body, (method, path, response.status_code)
    assert any("/u/" in u for u in urls) and any("/p/" in u for u in urls)
    leaked = [u for u in urls if EMAIL.search(u) or any(e in u for e in emails)]
    report(
        "logs, URLs and error pages of a full run",
        len(responses),
        len(responses) - error_pages,
        len(leaked),
        0,
        f"privacy: {len(responses)} requests, {written.count(chr(10))} log lines, {len(urls)} URLs, "
        f"{error_pages} error pages: 0 addresses, 0 whole tokens, 0 keys",
    )
    assert not leaked


def test_the_request_form_tells_nothing_by_answer_or_time_and_is_limited(make_app):
    app = make_app(
        REQUEST_MIN_SECONDS=0.25, RATELIMIT_PER_CLIENT="12 per hour", RATELIMIT_PER_ADDRESS="100 per hour"
    )
    with app.app_context():
        make_subscriber(db.session(), "kim@example.com")
    client = app.test_client()
    answers: dict[str, list[tuple[int, bytes, float]]] = {"kim@example.com": [], "kit@example.com": []}
    for _ in range(5):
        for email in answers:
            started = time.monotonic()
            response = client.post("/unsubscribe", data={"email": email})
            answers[email].append((response.status_code, response.get_data(), time.monotonic() - started))
    known, unknown = answers.values()
    assert {(s, b) for s, b, _ in known} == {(s, b) for s, b, _ in unknown}  # one status, one body
    assert known[0][0] == 200
    gap = abs(statistics.median(t for *_, t in known) - statistics.median(t for *_, t in unknown))
    assert gap < 0.1, gap  # within noise: both wait out the 0.25 s floor
    limited = [client.post("/unsubscribe", data={"email": "kim@example.com"}) for _ in range(3)]
    statuses = [r.status_code for r in limited]
    assert statuses == [200, 200, 429], statuses
    assert 0 < int(limited[-1].headers["Retry-After"]) <= 3600
    report(
        "request form: known vs unknown",
        13,
        12,
        0,
        0,
        f"request form: known and unknown answer alike (status, {len(known[0][1])}-byte body), medians "
        f"{gap * 1000:.1f} ms apart; the 13th request in an hour answered 429, Retry-After "
        f"{limited[-1].headers['Retry-After']} s",
    )


def test_a_removed_key_is_refused_and_a_retired_listed_key_still_works(make_app):
    retired, current = "retired-signing-key-0123456789", "current-signing-key-0123456789"
    app = make_app(SECRET_KEYS=[retired, current])
    with app.app_context():
        make_topic(db.session(), "news")
        ann = make_subscriber(db.session(), "ann@example.com").public_id
        bob = make_subscriber(db.session(), "bob@example.com").public_id
    client = app.test_client()
    by_retired = Tokens([retired]).unsubscribe(ann, "news")
    by_removed = Tokens(["removed-signing-key-0123456789"]).unsubscribe(bob, "news")
    assert client.post(f"/u/{by_retired}", data=ONE_CLICK).status_code == 200
    assert client.post(f"/u/{by_removed}", data=ONE_CLICK).status_code == 400
    assert client.get(f"/p/{Tokens([retired]).preferences(ann)}").status_code == 200
    # rotated away: the link that worked a moment ago is now refused
    rotated = make_app(SECRET_KEYS=[current])
    assert rotated.test_client().post(f"/u/{by_retired}", data=ONE_CLICK).status_code == 400
    with app.app_context():
        from prefs.domain import ledger

        assert not ledger.verdict_for(db.session(), "ann@example.com", "news").allowed
        assert ledger.verdict_for(db.session(), "bob@example.com", "news").allowed


def test_the_demo_server_masks_tokens_and_addresses_in_its_request_log(tmp_path):
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PREFS_INSTANCE_PATH": str(tmp_path),
        "PREFS_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "PREFS_SECRET_KEYS": "demo-signing-key-0123456789",
    }
    flask = Path(sys.executable).with_name("flask")
    out = (tmp_path / "demo.log").open("w")
    demo = subprocess.Popen(
        [str(flask), "--app", "prefs", "demo", "--port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        log = tmp_path / "demo.log"
        wait_until(
            lambda: "/p/" in log.read_text() and "Press CTRL+C" in log.read_text(), 30, "the demo server"
        )
        links = re.findall(rf"http://127\.0\.0\.1:{port}(/[up]/\S+)", log.read_text())
        base = f"127.0.0.1:{port}"
        for path in links:
            assert request(base, "GET", path)[0] == 200
        assert request(base, "GET", "/api/v1/subscribers/demo@example.com")[0] == 401
        wait_until(lambda: log.read_text().count("/api/v1/subscribers/") >= 1, 10, "the request log")
    finally:
        demo.terminate()
        demo.wait(10)
        out.close()
    printed = log.read_text()
    served = printed.split("Press CTRL+C", 1)[1]  # what the server wrote after it started
    assert "/u/[token]" in served and "/p/[token]" in served
    for path in links:
        assert path.split("/")[2] not in served
    assert "demo@example.com" not in served
