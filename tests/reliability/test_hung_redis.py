"""A Redis that hangs (SIGSTOP) under the rate limits: requests keep their speed.

The Redis here is the test's own, on a free loopback port, never the machine's shared one.
While it hangs the limits are skipped (fail open, as when it refuses connections), and
once it answers again they hold again.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from prefs.domain.tokens import Tokens
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import (
    FORM,
    ONE_CLICK_BODY,
    Outcome,
    Service,
    free_port,
    seed,
    timed,
    wait_until,
)

pytestmark = pytest.mark.reliability

CLIENTS = 8
WINDOW = 3.0  # seconds of load measured healthy, then hung
SUBSCRIBERS = 3000
LIMITS = {
    # the load itself never reaches a limit: each link and address is used once
    "PREFS_RATELIMIT_PER_CLIENT": "1000000 per hour",
    "PREFS_RATELIMIT_PER_ADDRESS": "3 per hour",
    "PREFS_RATELIMIT_ONE_CLICK": "3 per minute",
    "PREFS_RATELIMIT_API_KEY": "1000000 per minute",
}


@pytest.fixture
def own_redis(tmp_path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a redis-server of the test's own on a free loopback port."""
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, 10, "redis-server to answer")
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        client.close()
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def test_a_hung_redis_costs_no_speed_and_limits_return_with_it(service_database, tmp_path, own_redis):
    url, server = own_redis
    _, seeded = seed(
        service_database, tmp_path / "instance", (f"redis{i}@example.com" for i in range(SUBSCRIBERS))
    )
    tokens = Tokens(TEST_KEYS)
    links = iter([tokens.unsubscribe(pid, "news", "redis") for pid in seeded.public_ids[:-40]])
    spare = iter([tokens.unsubscribe(pid, "news", "redis") for pid in seeded.public_ids[-40:]])
    addresses = (f"limited{i}@example.com" for i in range(40))
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    check = json.dumps({"topic": "news", "recipients": ["redis1@example.com", "new@example.com"]})
    service = Service(service_database, tmp_path, PREFS_RATELIMIT_STORAGE_URI=url, **LIMITS).start()
    outcomes: list[tuple[str, Outcome]] = []
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**6))

    def client(n: int) -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            kind = ("one-click", "form", "api")[n % 3]
            n += 1
            if kind == "one-click":
                with lock:
                    link = next(links, None)
                if link is None:
                    continue
                outcome = timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM)
            elif kind == "form":
                with lock:
                    address = f"form{next(counter)}@example.com"
                outcome = timed(service.base, "POST", "/unsubscribe", body=f"email={address}", headers=FORM)
            else:
                outcome = timed(service.base, "POST", "/api/v1/check", body=check, headers=api)
            with lock:
                outcomes.append((kind, outcome))

    def one_click_statuses(link: str) -> list[int | None]:
        return [
            timed(service.base, "POST", f"/u/{link}", body=ONE_CLICK_BODY, headers=FORM).status
            for _ in range(4)
        ]

    def form_statuses(address: str) -> list[int | None]:
        body = f"email={address}"
        return [timed(service.base, "POST", "/unsubscribe", body=body, headers=FORM).status for _ in range(4)]

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    try:
        # the limits hold while Redis answers
        assert one_click_statuses(next(spare)) == [200, 200, 200, 429]
        assert form_statuses(next(addresses)) == [200, 200, 200, 429]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # warm
        healthy_from = time.monotonic()
        time.sleep(WINDOW)
        os.kill(server.pid, signal.SIGSTOP)
        hung_from = time.monotonic()
        time.sleep(WINDOW)
        hung_until = time.monotonic()
        stop.set()
        for thread in threads:
            thread.join(60)
        # while it hangs: let through, at once
        while_hung = one_click_statuses(next(spare))
        form_while_hung = form_statuses(next(addresses))
        os.kill(server.pid, signal.SIGCONT)
        # and once it answers again, the limits hold again, in every worker
        came_back = time.monotonic()

        def limits_hold() -> bool:
            return one_click_statuses(next(spare))[-1] == 429 and form_statuses(next(addresses))[-1] == 429

        wait_until(lambda: all(limits_hold() for _ in range(3)), 20, "the limits to hold again", step=0.2)
        held_after = time.monotonic() - came_back
        log = service.log()
    finally:
        stop.set()
        os.kill(server.pid, signal.SIGCONT)
        service.stop()

    def window(start: float, end: float) -> list[Outcome]:
        return [o for _, o in outcomes if start <= o.started < end]

    healthy, hung = window(healthy_from, hung_from), window(hung_from, hung_until)
    answered = [o for _, o in outcomes if o.status == 200]
    server_errors = [o for _, o in outcomes if o.status is not None and o.status >= 500]
    healthy_rate = sum(o.status == 200 for o in healthy) / WINDOW
    hung_rate = sum(o.status == 200 for o in hung) / WINDOW
    p50 = statistics.median(o.elapsed for o in hung) if hung else float("inf")
    warnings = log.count("rate limit storage")
    report(
        "Redis hung (SIGSTOP)",
        len(outcomes),
        len(answered),
        0,
        len(server_errors),
        f"hung Redis: {healthy_rate:.0f} answers/s healthy, {hung_rate:.0f}/s while it hung "
        f"(p50 {p50 * 1000:.0f} ms), limits held again {held_after:.1f} s after it came back, "
        f"{warnings} log lines about it",
    )
    assert not server_errors, {o.status for o in server_errors}
    assert len(answered) == len(outcomes), {o.status or o.error for _, o in outcomes}
    assert hung_rate >= 0.5 * healthy_rate, (healthy_rate, hung_rate)
    assert while_hung == [200, 200, 200, 200]  # fail open: a hung store turns nobody away
    assert form_while_hung == [200, 200, 200, 200]
    assert 0 < warnings <= 2 * int(service.env["PREFS_WORKERS"])  # once per worker and outage
