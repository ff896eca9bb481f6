"""Slow clients: 50 connections trickling their bodies in do not stop others being served."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from prefs.domain.tokens import Tokens
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

SLOW = 50
SECONDS = 10
FAST_ENOUGH = 1.0


def trickle(
    base: str, path: str, headers: dict[str, str], body: bytes, stop: threading.Event, sent: list[int]
) -> None:
    """Send the headers at once, then the body one byte a second, until told to stop."""
    host, port = base.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: {base}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            sock.sendall(head.encode())
            for byte in body:
                if stop.wait(1):
                    return
                sock.sendall(bytes([byte]))
                sent[0] += 1
    except OSError:
        return  # the server may close a connection that trickles too slowly: that is allowed


def test_fifty_slow_bodies_do_not_stop_other_clients(service_database, tmp_path):
    _, seeded = seed(service_database, tmp_path / "instance", ["ann@example.com"])
    tokens = Tokens(TEST_KEYS)
    link = tokens.unsubscribe(seeded.public_ids[0], "news")
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    check = json.dumps({"topic": "news", "recipients": ["ann@example.com"]}).encode()
    # the shipped worker class and threads; two workers, as on a small host
    service = Service(service_database, tmp_path, PREFS_WORKERS="4", PREFS_THREADS="16").start()
    stop = threading.Event()
    sent = [0]
    slow_bodies = [
        ("/u/" + link, {"Content-Type": "application/x-www-form-urlencoded"}, b"List-Unsubscribe=One-Click"),
        (
            "/api/v1/events",
            api,
            json.dumps({"events": [{"type": "unsubscribe", "email": "x@example.com"}]}).encode(),
        ),
    ]
    slow = [
        threading.Thread(target=trickle, args=(service.base, *slow_bodies[n % 2], stop, sent))
        for n in range(SLOW)
    ]
    fast: list[tuple[str, Outcome]] = []
    try:
        for thread in slow:
            thread.start()
        time.sleep(1.5)  # every slow connection is in, holding whatever it holds
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            fast.append(
                ("page", timed(service.base, "GET", f"/p/{tokens.preferences(seeded.public_ids[0])}"))
            )
            fast.append(("api", timed(service.base, "POST", "/api/v1/check", body=check, headers=api)))
            fast.append(("health", timed(service.base, "GET", "/healthz")))
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in slow:
            thread.join(10)
        service.stop()
    slowest = max(o.elapsed for _, o in fast)
    served = sum(1 for _, o in fast if o.status == 200)
    server_errors = sum(1 for _, o in fast if o.status is None or o.status >= 500)
    report(
        f"{SLOW} slow bodies, 1 byte/s",
        len(fast),
        served,
        0,
        server_errors,
        f"slow clients: {SLOW} connections trickling {sent[0]} bytes in {SECONDS} s; meanwhile {len(fast)} "
        f"other requests, {served} served, slowest {slowest:.2f} s",
    )
    assert served == len(fast), [
        (k, o.status, o.error, round(o.elapsed, 2)) for k, o in fast if o.status != 200
    ][:10]
    assert slowest < FAST_ENOUGH
    assert len(fast) >= 3 * 20


def test_slow_api_bodies_hold_no_database_connection(service_database, tmp_path):
    """Eight slow API bodies on one worker (pool of five) leave connections for the rest."""
    _, seeded = seed(service_database, tmp_path / "instance", ["ann@example.com"])
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    body = json.dumps({"events": [{"type": "unsubscribe", "email": "x@example.com"}]}).encode()
    check = json.dumps({"topic": "news", "recipients": ["ann@example.com"]}).encode()
    service = Service(service_database, tmp_path, PREFS_WORKERS="1", PREFS_THREADS="16").start()
    stop = threading.Event()
    sent = [0]
    slow = [
        threading.Thread(target=trickle, args=(service.base, "/api/v1/events", api, body, stop, sent))
        for _ in range(8)
    ]
    try:
        for thread in slow:
            thread.start()
        time.sleep(1.5)
        fast = [timed(service.base, "POST", "/api/v1/check", body=check, headers=api) for _ in range(5)]
    finally:
        stop.set()
        for thread in slow:
            thread.join(10)
        service.stop()
    slowest = max(o.elapsed for o in fast)
    report(
        "8 slow API bodies, one worker",
        len(fast),
        sum(1 for o in fast if o.status == 200),
        0,
        sum(1 for o in fast if o.status is None or o.status >= 500),
        f"slow API bodies: 8 on one worker with a pool of 5; {len(fast)} checks meanwhile answered "
        f"{sorted({o.status for o in fast}, key=str)}, slowest {slowest:.2f} s",
    )
    assert [o.status for o in fast] == [200] * len(fast)
    assert slowest < FAST_ENOUGH
