"""A PostgreSQL that hangs (SIGSTOP): every request is answered, a 503 within a bound, not never.

A stopped server still completes TCP handshakes and acknowledges what it is sent (the
kernel does that), so neither ``connect_timeout`` nor TCP's own timeouts end a statement
sent on a pooled connection, and a server's ``statement_timeout`` needs the server to
run. The PostgreSQL here is a throwaway cluster of the test's own (``harness.Cluster``),
so the test runs in the SQLite pass and the PostgreSQL pass alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from prefs.domain.tokens import Tokens
from prefs.models import Preference, Subscriber
from tests.conftest import TEST_KEYS, drop_postgresql_database, fresh_postgresql_database
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Cluster, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

SUBSCRIBERS = 40
STALL_MS = 2000  # the service's PREFS_DB_STALL_MS here
# every request sent while the server hangs is answered within this: the stall bound and its
# watcher's tick, then a new connection's 2 s connect_timeout, for each one-click group in turn
BOUND = 10.0


@pytest.fixture
def cluster():
    server = Cluster()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def server_processes(cluster: Cluster) -> list[int]:
    """Return the postmaster's pid and its children's."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True, timeout=5)
    return [postmaster, *(int(pid) for pid in children.stdout.split())]


def test_a_hung_postgresql_gets_every_request_a_503_in_bounded_time(cluster, tmp_path: Path) -> None:
    url = fresh_postgresql_database(cluster.url, "prefs_hung")
    _, seeded = seed(url, tmp_path / "instance", [f"hung{i}@example.com" for i in range(SUBSCRIBERS)])
    tokens = Tokens(TEST_KEYS)
    links = [tokens.unsubscribe(pid, "news", "hung") for pid in seeded.public_ids]
    api = {"Content-Type": "application/json", "Authorization": f"Bearer {seeded.api_key}"}
    check = json.dumps({"topic": "news", "recipients": ["hung0@example.com"]}).encode()
    page = f"/p/{tokens.preferences(seeded.public_ids[0])}"
    service = Service(
        url,
        tmp_path,
        PREFS_WORKERS="2",
        PREFS_THREADS="4",
        PREFS_DB_STALL_MS=str(STALL_MS),
        PREFS_DB_BUSY_TIMEOUT_MS="1000",
    )
    service.start()

    def send(n: int) -> tuple[str, Outcome, int | None]:
        kind = ("one-click", "check", "page", "healthz")[n % 4]
        if kind == "one-click":
            return (
                kind,
                timed(service.base, "POST", f"/u/{links[n]}", body=ONE_CLICK_BODY, headers=FORM, timeout=40),
                n,
            )
        if kind == "check":
            return (
                kind,
                timed(service.base, "POST", "/api/v1/check", body=check, headers=api, timeout=40),
                None,
            )
        return kind, timed(service.base, "GET", page if kind == "page" else "/healthz", timeout=40), None

    stopped: list[int] = []
    try:
        with ThreadPoolExecutor(8) as pool:
            # every worker's pool holds connections that worked a moment ago
            warm = list(pool.map(send, range(8)))
            assert all(o.status == 200 for _, o, _ in warm), [(k, o.status) for k, o, _ in warm]
            stopped = server_processes(cluster)
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            hung = list(pool.map(send, range(8, 8 + 16)))
            # the workers' own figures are what an operator needs now, the database or not
            scrape = timed(service.base, "GET", "/metrics", timeout=40)
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped = []
            time.sleep(1)
            back = list(pool.map(send, range(24, 32)))
        log = service.log()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        service.stop()

    engine = create_engine(url)
    with engine.connect() as conn:
        out = set(
            conn.scalars(
                select(Subscriber.public_id)
                .join(Preference, Preference.subscriber_id == Subscriber.id)
                .where(Preference.subscribed.is_(False))
            )
        )
    engine.dispose()
    drop_postgresql_database(url)
    outcomes = [*hung, *back]
    acked = [n for k, o, n in outcomes if n is not None and o.status == 200]
    lost = [n for n in acked if seeded.public_ids[n] not in out]
    statuses = Counter(o.status for _, o, _ in hung)
    slowest = max(o.elapsed for _, o, _ in hung)
    report(
        "PostgreSQL hung (SIGSTOP)",
        len(outcomes),
        len(acked),
        len(lost),
        sum(1 for _, o, _ in outcomes if o.status is not None and o.status >= 500),
        f"hung PostgreSQL: {len(hung)} requests while it hung: {dict(statuses)}, slowest {slowest:.1f} s;"
        f" {sum(o.status == 200 for _, o, _ in back)} of {len(back)} answered 200 once it ran again;"
        f" {len(lost)} acknowledged opt-outs lost; /metrics {scrape.status} in {scrape.elapsed:.1f} s",
    )
    assert not lost
    assert scrape.status == 200 and scrape.elapsed < BOUND, (scrape.status, scrape.elapsed, scrape.body[:200])
    assert b'prefs_http_errors_total{status="503"}' in scrape.body
    unanswered = [(k, o.error, round(o.elapsed, 1)) for k, o, _ in hung if o.status is None]
    assert not unanswered, unanswered
    assert slowest < BOUND, [(k, o.status, round(o.elapsed, 1)) for k, o, _ in hung]
    assert all(o.status == 503 for _, o, _ in hung), statuses
    assert all(o.status == 200 for _, o, _ in back), [(k, o.status) for k, o, _ in back]
    traced = [line for line in log.splitlines() if "Traceback" in line]
    assert not traced, traced[:1]
