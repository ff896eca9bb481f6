"""The trust boundaries held at gunicorn, not only in the test client: hosts, probes, paths, logs."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factories import bearer
from tests.reliability.figures import report
from tests.reliability.harness import Service, request, seed

pytestmark = pytest.mark.reliability

SLASHED = "a/b@example.com"
KNOWN = ["ann@example.com", SLASHED, "zoe+news@example.org"]
ADDRESS_PARTS = ("ann@", "a/b@", "a%2Fb", "zoe+news", "zoe%2Bnews", "example.com", "example.org")


@pytest.fixture
def service(service_database: str, tmp_path: Path) -> Iterator[tuple[Service, str, Path]]:
    """One gunicorn with the shipped config, a home of its own, and an admin key."""
    _, seeded = seed(service_database, tmp_path / "instance", KNOWN)
    home = tmp_path / "home"
    home.mkdir()
    running = Service(
        service_database,
        tmp_path,
        PREFS_WORKERS="2",
        PREFS_LOG_LEVEL="DEBUG",
        HOME=str(home),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
    ).start()
    try:
        yield running, seeded.api_key, tmp_path
    finally:
        running.stop()


def raw(base: str, data: bytes) -> int | None:
    """Send bytes as one request on a fresh connection; return the status, or None for none."""
    host, port = base.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(data)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    found = re.match(rb"HTTP/1\.[01] ([0-9]{3})", answer)
    return int(found.group(1)) if found else None


HOSTS = {
    "empty": b"Host: \r\n",
    "malformed": b"Host: exa mple..com:\r\n",
    "port": b"Host: 127.0.0.1:1\r\n",
    "ipv6": b"Host: [::1]:8000\r\n",
    "bad-characters": b"Host: a\"<b>%00'\r\n",
    "non-ascii": "Host: bücher.example\r\n".encode(),
    "forwarded-host": b"Host: attacker.example\r\nX-Forwarded-Host: attacker.example\r\n",
    "absolute-uri": None,
    "two-hosts": b"Host: a.example\r\nHost: b.example\r\n",
    "nul": b"Host: a\x00b.example\r\n",
    "folded": b"Host: a.example\r\n b.example\r\n",
    "absent-1.0": None,
    "absent-1.1": None,
}


# requests RFC 9112 has a server refuse (400) before any application sees them
INVALID = {"two-hosts", "nul", "folded"}


def host_request(name: str, path: str) -> bytes:
    if name == "absolute-uri":
        return f"GET http://attacker.example{path} HTTP/1.1\r\nHost: attacker.example\r\n\r\n".encode()
    if name == "absent-1.0":
        return f"GET {path} HTTP/1.0\r\n\r\n".encode()
    if name == "absent-1.1":
        return f"GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
    return f"GET {path} HTTP/1.1\r\nConnection: close\r\n".encode() + HOSTS[name] + b"\r\n"


def test_the_probe_answers_whatever_the_host_and_no_page_answers_for_an_unknown_one(service):
    running, _, _ = service
    statuses = {
        name: (raw(running.base, host_request(name, "/healthz")), raw(running.base, host_request(name, "/")))
        for name in HOSTS
    }
    # the probe answers 200 to any request it can be sent; an invalid one is gunicorn's 400
    wrong_probe = [n for n, (probe, _) in statuses.items() if probe != (400 if n in INVALID else 200)]
    # a page never answers for a host it does not serve, and never with a 5xx
    wrong_page = [n for n, (_, page) in statuses.items() if page is None or not 400 <= page < 500]
    errors = sum(1 for pair in statuses.values() for status in pair if status is None or status >= 500)
    report(
        "odd Host headers at gunicorn (probe, page)",
        2 * len(HOSTS),
        sum(1 for pair in statuses.values() for status in pair if status is not None and status < 400),
        0,
        errors,
        f"{len(HOSTS)} Host variants: /healthz wrong for {wrong_probe}, a page wrong for {wrong_page}",
    )
    assert wrong_probe == [] and wrong_page == [], statuses
    assert errors == 0, statuses


def test_gunicorn_opens_no_control_socket(service):
    running, _, tmp_path = service
    made = [p for p in tmp_path.rglob("*") if p.is_socket() or p.suffix == ".ctl"]
    made += [p for p in Path(running.env["HOME"]).rglob("*")]
    assert made == [], made


def test_an_address_with_a_slash_is_named_at_gunicorn_and_never_logged(service):
    running, key, _ = service
    auth = bearer(key)
    statuses = []
    for path in ("/api/v1/subscribers/a%2Fb%40example.com", "/api/v1/subscribers/a%2Fb@example.com"):
        status, _, body = request(running.base, "GET", path, headers=auth)
        statuses.append(status)
        assert status == 200 and SLASHED.encode() in body, (path, status, body[:200])
    status, _, _ = request(running.base, "DELETE", "/api/v1/subscribers/a%2Fb@example.com", headers=auth)
    statuses.append(status)
    assert status == 204
    log = running.log()
    assert SLASHED not in log and "a%2Fb" not in log, log[-2000:]


FORWARDING = (
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
    "X-Client-IP",
    "True-Client-IP",
    "CF-Connecting-IP",
    "CF-Connecting-IPv6",
    "Fastly-Client-IP",
    "X-Cluster-Client-IP",
    "X-Original-Forwarded-For",
    "Via",
    "CDN-Loop",
    "X-Azure-SocketIP",
    "X-Amzn-Trace-Id",
    "X-Envoy-External-Address",
)


def test_metrics_are_local_only_without_any_forwarding_header_at_gunicorn(service):
    running, _, _ = service
    assert request(running.base, "GET", "/metrics")[0] == 200
    statuses = {
        name: request(running.base, "GET", "/metrics", headers={name: "203.0.113.9"})[0]
        for name in FORWARDING
    }
    refused = sum(status == 403 for status in statuses.values())
    report(
        "/metrics from a proxy on this host (forwarding headers)",
        len(statuses),
        len(statuses) - refused,
        0,
        sum(status >= 500 for status in statuses.values()),
        f"{len(statuses)} forwarding headers from 127.0.0.1: /metrics refused {refused}",
    )
    assert refused == len(statuses), statuses


NOBODY = ("nobody", "example.net")
# an address in every place and form a request can put it, at gunicorn
LOGGED_PATHS = (
    "/api/v1/subscribers/nobody%40example.net",
    "/api/v1/subscribers/nobody%2540example.net",
    "/api/v1/subscribers/nobody%2Btag%40example.net",
    "/api/v1/subscribers/no%2Fbody%40example.net",
    "/no/such/page?e=nobody%40example.net&f=nobody+x%40example.net",
    "/no/such/page?e=nobody&#64;example.net",
    "/healthz?e=nobody@example.net",
)


def test_no_form_of_an_address_reaches_the_log_at_debug(service):
    running, key, _ = service
    statuses = []
    for path in LOGGED_PATHS:
        headers = {
            **bearer(key),
            "Referer": f"https://mail.example{path}",
            "User-Agent": "nobody@example.net",
            "X-Request-ID": "nobody@example.net",
        }
        statuses.append(request(running.base, "GET", path, headers=headers)[0])
    # requests gunicorn refuses itself, naming what it refused in its warning
    for data in (
        b"GET /nobody@example.net HTTP/1.1 extra\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: nobody@example.net\r\nBad Header nobody%40example.net: x\r\n\r\n",
        b"GET /x?e=nobody%40example.net" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
        b"NOBODY@EXAMPLE.NET /x HTTP/1.1\r\n\r\n",
    ):
        statuses.append(raw(running.base, data))
    log = running.log().lower()
    leaked = [part for part in NOBODY if part in log]
    report(
        "addresses in paths, queries, headers, bad requests (log at DEBUG)",
        len(statuses),
        sum(status is not None and status < 400 for status in statuses),
        len(leaked),
        sum(status is None or status >= 500 for status in statuses),
        f"{len(statuses)} requests carrying an address in some form: the log holds {leaked or 'none of it'}",
    )
    assert leaked == [], [line for line in log.splitlines() if any(p in line for p in NOBODY)][:5]
    assert all(status is not None and status < 500 for status in statuses), statuses
