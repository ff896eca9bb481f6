"""The HTTP edge against real gunicorn: Host headers, long request lines, DEBUG logs, limits, metrics."""

from __future__ import annotations

import json
import re
import socket
import statistics
import threading
import time
from urllib.parse import quote

import pytest
import redis
from sqlalchemy import create_engine, text

from prefs.domain.tokens import Tokens
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import ONE_CLICK_BODY, Service, request, seed, timed

pytestmark = pytest.mark.reliability

BASE = "https://prefs.example.com"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
REDIS_URL = "redis://127.0.0.1:6379/11"  # this module's own database


def raw(base: str, data: bytes, timeout: float = 10) -> int | None:
    """Send bytes as they are on a fresh connection; return the status the server answered."""
    host, port = base.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except OSError:
            return None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(match.group(1)) if match else None


def test_no_host_header_of_any_spelling_reaches_a_mailed_link(service_database, tmp_path, smtp_server):
    seed(service_database, tmp_path / "instance", ["ann@example.com"])
    service = Service(
        service_database,
        tmp_path,
        PREFS_BASE_URL=BASE,
        PREFS_TRUSTED_PROXIES="1",  # the proxy is on 127.0.0.1, as the tests' client is
        PREFS_SMTP_URL=smtp_server.url,
        PREFS_RATELIMIT_PER_CLIENT="1000 per hour",
        PREFS_RATELIMIT_PER_ADDRESS="1000 per hour",
        PREFS_WORKERS="2",
    ).start()
    body = "email=ann%40example.com"
    good = {**FORM, "Host": "prefs.example.com"}
    refused = [
        {**FORM, "Host": "attacker.example"},
        {**FORM, "Host": "attacker.example:443"},
        {**FORM, "Host": "prefs.example.com.attacker.example"},
        {**FORM, "Host": "[::1]:8000"},
        {**FORM, "Host": f"127.0.0.1:{service.port}"},
        {**good, "X-Forwarded-Host": "attacker.example", "X-Forwarded-For": "198.51.100.7"},
        # one trusted proxy: the last value is the one it set, anything before it the client's
        {
            **good,
            "X-Forwarded-Host": "prefs.example.com, attacker.example",
            "X-Forwarded-For": "198.51.100.7",
        },
    ]
    served = [
        good,
        {**FORM, "Host": "PREFS.EXAMPLE.COM"},
        {**FORM, "Host": "prefs.example.com."},
        {**FORM, "Host": "prefs.example.com:8443"},
        {
            **FORM,
            "Host": "10.0.0.7:8000",
            "X-Forwarded-Host": "prefs.example.com",
            "X-Forwarded-For": "198.51.100.7",
        },
        {
            **good,
            "X-Forwarded-Host": "attacker.example, prefs.example.com",
            "X-Forwarded-For": "198.51.100.7",
        },
    ]
    outcomes = []
    try:
        for headers in refused:
            outcomes.append(
                ("refused", headers, request(service.base, "POST", "/unsubscribe", body, headers)[0])
            )
        for headers in served:
            outcomes.append(
                ("served", headers, request(service.base, "POST", "/unsubscribe", body, headers)[0])
            )
        # absolute-form request lines: the authority in the line, another in the Host header
        for line_host, host in (
            ("attacker.example", "prefs.example.com"),
            ("prefs.example.com", "attacker.example"),
        ):
            status = raw(
                service.base,
                f"POST http://{line_host}/unsubscribe HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode(),
            )
            outcomes.append(("absolute", {"line": line_host, "Host": host}, status))
        two_hosts = (
            "POST /unsubscribe HTTP/1.1\r\nHost: prefs.example.com\r\nHost: attacker.example\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}"
        )
        outcomes.append(("two hosts", {}, raw(service.base, two_hosts.encode())))
        healthz = [
            request(service.base, "GET", "/healthz", headers={"Host": h})[0] for h in ("x.example", "")
        ]
    finally:
        service.stop()
    acknowledged = [o for o in outcomes if o[2] == 200]
    messages = smtp_server.inbox.wait_for(len(acknowledged)) if acknowledged else []
    links = [re.findall(r"\S+/p/\S+", m.get_body(("plain",)).get_content()) for m in messages]
    poisoned = [found for found in links if not found or any(not u.startswith(BASE + "/p/") for u in found)]
    server_errors = sum(1 for o in outcomes if o[2] is not None and o[2] >= 500)
    report(
        "Host header variants at gunicorn",
        len(outcomes),
        len(acknowledged),
        len(poisoned),
        server_errors,
        f"Host: {len(outcomes)} spellings of the host (other hosts, ports, case, trailing dot, IPv6, "
        f"X-Forwarded-Host, absolute-form, two Host lines): {len(acknowledged)} served, every mailed "
        f"link on {BASE}; {len(poisoned)} poisoned, {server_errors} 5xx",
    )
    assert [o for o in outcomes if o[0] == "refused" and o[2] != 400] == []
    assert [o for o in outcomes if o[0] == "served" and o[2] != 200] == []
    assert healthz == [200, 200]
    assert not poisoned and server_errors == 0
    assert len(messages) == len(acknowledged) >= len(served)


ATTACKERS = 4
ATTACK_SECONDS = 4.0


def test_long_request_lines_to_a_404_leave_healthz_fast(service_database, tmp_path):
    seed(service_database, tmp_path / "instance", [])
    service = Service(service_database, tmp_path, PREFS_WORKERS="2", PREFS_THREADS="4").start()
    # as long as gunicorn lets a request line be, shaped to make a backtracking mask quadratic
    shapes = [
        "/" + "a" * 8000 + "/@",
        "/" + "%4" * 4000 + "%40",
        "/u/" * 2600 + "x@",
        "/" + "b" * 4000 + "?e=" + "c" * 3900 + " @".replace(" ", "%20"),
    ]
    referer = "x" * 8000 + " @"
    stop = threading.Event()
    attacks: list[int | None] = []
    probes = []

    def attack(n: int) -> None:
        while not stop.is_set():
            path = shapes[n % len(shapes)]
            outcome = timed(service.base, "GET", path, headers={"Referer": referer, "User-Agent": referer})
            attacks.append(outcome.status)

    threads = [threading.Thread(target=attack, args=(n,)) for n in range(ATTACKERS)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < deadline:
            probes.append(timed(service.base, "GET", "/healthz", timeout=10))
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        service.stop()
    latencies = [p.elapsed for p in probes]
    slowest, median = max(latencies), statistics.median(latencies)
    server_errors = sum(1 for s in attacks if s is not None and s >= 500)
    report(
        "long request lines to a 404",
        len(attacks),
        sum(1 for s in attacks if s == 404),
        0,
        server_errors,
        f"long lines: {ATTACKERS} clients sent {len(attacks)} 8 KB request lines (and 8 KB Referer and "
        f"User-Agent) to a 404; /healthz answered {len(probes)} probes, median {median * 1000:.0f} ms, "
        f"slowest {slowest * 1000:.0f} ms",
    )
    assert all(p.status == 200 for p in probes)
    assert server_errors == 0
    assert median < 0.1 and slowest < 1.0, (median, slowest)
    # the app's access line names the route, never the path: nothing of the attack is written
    assert "a" * 100 not in service.log()


def test_at_debug_no_logger_writes_an_address_or_a_whole_token(service_database, tmp_path):
    addresses = ["nobody@example.com", "ann.smith+news@example.org", "carol@example.net"]
    _, seeded = seed(service_database, tmp_path / "instance", addresses)
    tokens = Tokens(TEST_KEYS)
    links = [tokens.unsubscribe(p, "news", "c1") for p in seeded.public_ids]
    centers = [tokens.preferences(p) for p in seeded.public_ids]
    service = Service(
        service_database,
        tmp_path,
        PREFS_LOG_LEVEL="DEBUG",
        PREFS_WORKERS="2",
        PREFS_RATELIMIT_PER_CLIENT="1000 per hour",
    ).start()
    api = {"Authorization": f"Bearer {seeded.api_key}"}
    json_api = {**api, "Content-Type": "application/json"}
    nobody, ann, carol = addresses
    calls = [
        ("DELETE", f"/api/v1/subscribers/{nobody}", None, api),
        ("GET", f"/api/v1/subscribers/{quote(ann)}", None, api),
        ("GET", f"/api/v1/subscribers/{quote(quote(carol))}", None, api),
        ("GET", "/api/v1/subscribers/" + quote("nobody\uff20example.com"), None, api),
        (
            "GET",
            f"/unsubscribe?email={quote(ann)}&again={ann}",
            None,
            {"Referer": f"https://x.example/?{carol}"},
        ),
        ("GET", "/healthz", None, {"X-Custom": nobody, "From": carol}),
        ("POST", "/unsubscribe", f"email={quote(ann)}", FORM),
        ("POST", "/api/v1/check", json.dumps({"topic": "news", "recipients": addresses}), json_api),
        ("POST", "/api/v1/events", json.dumps({"events": [{"type": "bounce", "email": carol}]}), json_api),
        ("GET", f"/u/{links[0]}", None, {}),
        ("POST", f"/u/{links[0]}", ONE_CLICK_BODY, FORM),
        ("POST", f"/u/{links[1]}", ONE_CLICK_BODY, FORM),
        ("POST", f"/u/{links[2]}", "scope=all", FORM),
        ("HEAD", f"/u/{links[2]}", None, {}),
        ("GET", f"/p/{centers[0]}?lang=de", None, {"Referer": f"https://mail.example/u/{links[1]}"}),
        ("POST", f"/p/{centers[1]}", "action=leave-all", FORM),
        ("GET", f"/p/{centers[2][:-2]}xx", None, {}),
        ("POST", "/u%2F" + links[2], ONE_CLICK_BODY, FORM),
    ]
    statuses = []
    try:
        for method, path, body, headers in calls:
            statuses.append(request(service.base, method, path, body, headers)[0])
        # what gunicorn refuses itself, and logs: a malformed request line, a malformed header
        statuses.append(raw(service.base, f"GET /api/v1/subscribers/{nobody} HTTP/1.1 x\r\n\r\n".encode()))
        statuses.append(
            raw(service.base, f"GET / HTTP/1.1\r\nHost: x\r\nBad Header{carol}: 1\r\n\r\n".encode())
        )
        statuses.append(raw(service.base, f"G@T /p/{centers[0]} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))
    finally:
        service.stop()
    engine = create_engine(service_database)
    with engine.connect() as conn:
        fingerprint_key = conn.execute(text("SELECT value FROM instance_secrets")).scalar_one()
    engine.dispose()
    log = service.log()
    secrets = [
        *addresses,
        *(a.split("@")[0] for a in addresses),
        *links,
        *centers,
        *(t.rsplit(".", 1)[1] for t in links + centers),  # the signatures
        seeded.api_key,
        fingerprint_key,
    ]
    leaked = [s for s in secrets if s.lower() in log.lower()]
    server_errors = sum(1 for s in statuses if s is not None and s >= 500)
    report(
        "DEBUG logs of gunicorn, SQLAlchemy, werkzeug",
        len(statuses),
        sum(1 for s in statuses if s is not None and s < 400),
        len(leaked),
        server_errors,
        f"DEBUG: {len(statuses)} requests with addresses in paths, queries, headers and bodies and tokens "
        f"in /u/ and /p/; {log.count(chr(10))} log lines from every logger: {len(leaked)} secrets written",
    )
    assert "DEBUG" in log.upper()  # the level really was DEBUG: gunicorn's own debug lines are there
    assert not leaked, leaked
    assert server_errors == 0
    # one log format: every line gunicorn and the app wrote is a JSON object
    assert [line for line in log.splitlines() if line.strip() and not line.startswith("{")] == []


@pytest.fixture
def redis_db():
    """Return this module's Redis database, emptied before and after."""
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    yield store
    store.flushdb()
    store.close()


def test_with_several_workers_a_limit_holds_as_configured_or_the_service_says_it_cannot(
    service_database, tmp_path, smtp_server, redis_db
):
    seed(service_database, tmp_path / "instance", [])
    limited = {"PREFS_RATELIMIT_PER_ADDRESS": "3 per hour", "PREFS_RATELIMIT_PER_CLIENT": "1000 per hour"}
    shared = Service(
        service_database,
        tmp_path,
        PREFS_RATELIMIT_STORAGE_URI=REDIS_URL,
        PREFS_SMTP_URL=smtp_server.url,
        PREFS_TRUSTED_PROXIES="1",
        **limited,
    ).start()
    tried = 24
    try:
        statuses = []
        for n in range(tried):
            headers = {**FORM, "X-Forwarded-For": f"198.51.100.{n + 1}"}
            body = f"email=target%2B{n}%40example.com"
            statuses.append(request(shared.base, "POST", "/unsubscribe", body, headers)[0])
    finally:
        shared.stop()
    keys = [k.decode() for k in redis_db.keys("*")]
    alone = Service(service_database, tmp_path, PREFS_RATELIMIT_STORAGE_URI="memory://", **limited).start()
    alone.stop()
    single = Service(service_database, tmp_path, PREFS_WORKERS="1", **limited).start()
    single.stop()
    acknowledged = statuses.count(200)
    said = [line for line in alone.log().splitlines() if "memory://" in line]
    report(
        "per-address limit, 4 workers, one mailbox",
        tried,
        acknowledged,
        0,
        sum(1 for s in statuses if s >= 500),
        f"limits: {tried} requests for target+N@example.com from {tried} clients at 4 workers: "
        f"{acknowledged} mails (limit 3); memory:// said so {len(said)} time at start",
    )
    assert acknowledged == 3, statuses
    assert len(smtp_server.inbox.wait_for(3)) == 3
    assert keys and not [k for k in keys if "198.51.100" in k or "target" in k or "@" in k]
    assert len(said) == 1, said
    assert "PREFS_RATELIMIT_STORAGE_URI" in said[0]
    assert "memory://" not in single.log()  # one worker counts for the whole host


def test_metrics_are_local_only_without_forwarding_headers_of_any_kind(service_database, tmp_path):
    seed(service_database, tmp_path / "instance", [])
    service = Service(service_database, tmp_path, PREFS_WORKERS="1").start()
    forwarded = [
        {"X-Forwarded-For": "203.0.113.9"},
        {"X-Real-IP": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"X-Forwarded-Host": "prefs.example.com"},
        {"X-Client-IP": "203.0.113.9"},
        {"True-Client-IP": "203.0.113.9"},
        {"CF-Connecting-IP": "203.0.113.9"},
        {"Fastly-Client-IP": "203.0.113.9"},
        {"X-Cluster-Client-IP": "203.0.113.9"},
        {"Via": "1.1 proxy"},
    ]
    try:
        plain = request(service.base, "GET", "/metrics")[0]
        statuses = [request(service.base, "GET", "/metrics", headers=h)[0] for h in forwarded]
    finally:
        service.stop()
    opened = sum(1 for s in statuses if s == 200)
    report(
        "/metrics through a proxy on this host",
        len(statuses),
        opened,
        opened,
        sum(1 for s in statuses if s >= 500),
        f"metrics: {len(statuses)} forwarded requests from 127.0.0.1 (X-Real-IP, Forwarded, ...): "
        f"{opened} read the metrics; an unforwarded local one did ({plain})",
    )
    assert plain == 200
    assert statuses == [403] * len(forwarded), dict(
        zip([next(iter(h)) for h in forwarded], statuses, strict=True)
    )
