"""The HTTP edge against real gunicorn: Host headers."""

from __future__ import annotations

import re
import socket

import pytest

from tests.reliability.figures import report
from tests.reliability.harness import Service, request, seed

pytestmark = pytest.mark.reliability

BASE = "https://prefs.example.com"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


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
