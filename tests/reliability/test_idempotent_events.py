"""A mailer that lost an answer sends its batch again with the same ``Idempotency-Key``."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import drop_postgresql_database, fresh_postgresql_database
from tests.reliability.figures import report
from tests.reliability.harness import Cluster, Outcome, Service, seed, timed, wait_until
from tests.reliability.test_lock_order import api_events_by_campaign

pytestmark = pytest.mark.reliability

BATCHES = 30
EVENTS = 40
RACED = 10  # batches first sent four times at once with one key
CLIENTS = 6


def batch(n: int) -> list[dict[str, Any]]:
    """Return batch ``n``: 40 opt-outs of subscribers no other batch names, each a change."""
    return [
        {"type": "unsubscribe", "email": f"i{n}x{i}@example.com", "topic": "news", "campaign": f"i{n}e{i}"}
        for i in range(EVENTS)
    ]


def send_and_hang_up(base: str, body: bytes, headers: dict[str, str]) -> None:
    """Send one request and close the connection before the answer: the answer is lost."""
    host, port = base.rsplit(":", 1)
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(len(body))}.items())
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(f"POST /api/v1/events HTTP/1.1\r\nHost: {base}\r\n{head}\r\n".encode() + body)


def test_events_sent_again_with_the_same_key_get_the_first_answer(service_database, tmp_path):
    _, seeded = seed(
        service_database, tmp_path / "instance", [e["email"] for n in range(BATCHES) for e in batch(n)]
    )
    service = Service(service_database, tmp_path).start()
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    keys = [str(uuid.uuid4()) for _ in range(BATCHES)]
    bodies = [json.dumps({"events": batch(n)}).encode() for n in range(BATCHES)]

    def send(n: int, body: bytes | None = None) -> tuple[int, Outcome]:
        headers = {**api, "Idempotency-Key": keys[n]}
        return n, timed(
            service.base, "POST", "/api/v1/events", body=body or bodies[n], headers=headers, timeout=30
        )

    try:
        # the first batches: four copies at once, with one key, as a client that retries early
        with ThreadPoolExecutor(CLIENTS) as pool:
            raced = list(pool.map(send, [n for n in range(RACED) for _ in range(4)]))
        # the others: sent, and the answer lost; then sent again, twice, by two clients at once
        for n in range(RACED, BATCHES):
            send_and_hang_up(service.base, bodies[n], {**api, "Idempotency-Key": keys[n]})
        wanted = {e["campaign"] for n in range(BATCHES) for e in batch(n)}
        wait_until(
            lambda: set(api_events_by_campaign(service_database)) == wanted, 60, "the lost answers' commits"
        )
        with ThreadPoolExecutor(CLIENTS) as pool:
            retried = list(pool.map(send, [n for n in range(RACED, BATCHES) for _ in range(2)]))
        # the same key with another body is refused
        other = json.dumps({"events": batch(0)[:1]}).encode()
        misused = [send(n, other)[1] for n in (0, RACED)]
        plain = timed(service.base, "POST", "/api/v1/events", body=bodies[1], headers=api)
        log = service.log()
    finally:
        service.stop()
    on_file = api_events_by_campaign(service_database)

    outcomes = raced + retried
    statuses = Counter(o.status for _, o in outcomes)
    first = {"results": [{"status": "accepted", "changed": True}] * EVENTS}
    wrong = [
        (n, o.status, o.body[:120]) for n, o in outcomes if o.status != 200 or json.loads(o.body) != first
    ]
    bodies_by_batch = {n: {o.body for m, o in outcomes if m == n} for n in range(BATCHES)}
    twice = [c for c, count in on_file.items() if count != 1]
    server_errors = sum(1 for _, o in outcomes if o.status is None or o.status >= 500)
    report(
        "events retried with Idempotency-Key",
        len(outcomes),
        statuses[200],
        len(wrong) + len(twice),
        server_errors,
        f"idempotent retries: {RACED} batches sent 4 times at once, {BATCHES - RACED} sent with the "
        f"answer lost then twice again, {dict(statuses)}, {len(wrong)} answers unlike the first, "
        f"{len(twice)} events not on file exactly once; another body with a used key: "
        f"{[o.status for o in misused]}",
    )
    assert not wrong, wrong[:5]
    assert all(len(b) == 1 for b in bodies_by_batch.values())  # byte for byte the same answer
    assert not twice and len(on_file) == BATCHES * EVENTS
    for outcome in misused:
        assert outcome.status == 422 and json.loads(outcome.body)["error"]["code"] == "idempotency_key_reused"
    # without a key, a batch sent again is a new request: nothing changes any more
    assert plain.status == 200 and not any(r["changed"] for r in json.loads(plain.body)["results"])
    assert "Traceback" not in log


@pytest.fixture
def cluster():
    server = Cluster()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def test_postgresql_restarted_under_keyed_batches_records_each_event_once(cluster, tmp_path):
    url = fresh_postgresql_database(cluster.url, "prefs_restart")
    _, seeded = seed(url, tmp_path / "instance", [e["email"] for n in range(BATCHES) for e in batch(n)])
    service = Service(url, tmp_path, PREFS_WORKERS="2", PREFS_THREADS="4").start()
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    tried: list[Outcome] = []
    final: dict[int, Outcome] = {}
    lock = threading.Lock()

    def sender(first: int) -> None:
        deadline = time.monotonic() + 90
        for n in range(first, BATCHES, 4):
            headers = {**api, "Idempotency-Key": f"restart-{n}"}
            body = json.dumps({"events": batch(n)}).encode()
            while time.monotonic() < deadline:  # a mailer retrying a batch until it is answered
                outcome = timed(
                    service.base, "POST", "/api/v1/events", body=body, headers=headers, timeout=15
                )
                with lock:
                    tried.append(outcome)
                if outcome.status == 200:
                    final[n] = outcome
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        cluster.stop()  # sessions cut mid-batch, then refused
        time.sleep(2)
        cluster.start()
        for thread in threads:
            thread.join(120)
        log = service.log()
    finally:
        service.stop()
    on_file = api_events_by_campaign(url)
    drop_postgresql_database(url)

    statuses = Counter(o.status for o in tried)
    first = {"results": [{"status": "accepted", "changed": True}] * EVENTS}
    wrong = [n for n, o in final.items() if json.loads(o.body) != first]
    twice = [c for c, count in on_file.items() if count != 1]
    report(
        "PostgreSQL restarted under keyed event batches",
        len(tried),
        len(final),
        len(wrong) + len(twice) + BATCHES - len(final),
        sum(n for s, n in statuses.items() if s is None or s >= 500),
        f"restart under keyed batches: {BATCHES} batches, {len(tried)} tries {dict(statuses)}, "
        f"{len(final)} answered 200 in the end, {len(wrong)} final answers unlike a first one, "
        f"{len(twice)} events not on file exactly once",
    )
    assert len(final) == BATCHES and not wrong
    assert not twice and len(on_file) == BATCHES * EVENTS
    assert set(statuses) <= {200, 503, None}, statuses  # refused while down, never a 500
    assert "Traceback" not in log
