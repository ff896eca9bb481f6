"""A big register: the overview and the register's pages stay small, whole, and within a statement timeout."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.reliability.figures import report
from tests.reliability.harness import Service, seed, timed

pytestmark = pytest.mark.reliability

SUBSCRIBERS = 50_000
EVENTS = 300_000
OPEN = 20_000
PAGE = 500
# what a page may weigh: 50 rows and the charts' tables, whatever the register holds
MOST_BYTES = 100_000


def numbers(postgresql: bool, count: int) -> str:
    """Return SQL naming the rows 1..count as ``g(i)``."""
    if postgresql:
        return f"generate_series(1, {count}) AS g(i)"
    return (
        f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})"
        " SELECT i FROM n) AS g"
    )


def ago(postgresql: bool, days: str) -> str:
    """Return SQL for a time ``days`` ago, stored as the service stores times."""
    if postgresql:
        return f"CURRENT_TIMESTAMP - make_interval(days => {days})"
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+d days', -({days}))) || '000'"


def fill(database_url: str) -> None:
    """Add subscribers, a year of opt-out events and open requests, as set-based statements."""
    postgresql = database_url.startswith("postgresql")
    engine = create_engine(database_url)
    with engine.begin() as conn:
        if postgresql:  # counted a statement at a time, as an import is
            conn.execute(text("SELECT set_config('prefs.tally_bulk', 'on', true)"))
        conn.execute(
            text(
                "INSERT INTO subscribers (public_id, email, created_at, version)"
                f" SELECT 'r' || i, 'user' || i || '@example.com', {ago(postgresql, '0')}, 1"
                f" FROM {numbers(postgresql, SUBSCRIBERS)}"
            )
        )
        conn.execute(
            text(
                "INSERT INTO events (txid, subscriber_id, topic_id, action, source, campaign, created_at)"
                f" SELECT 1, 1 + i % {SUBSCRIBERS}, NULL, 'unsubscribe', 'api', 'c' || (i % 40),"
                f" {ago(postgresql, 'i % 365')} FROM {numbers(postgresql, EVENTS)}"
            )
        )
        conn.execute(
            text(
                "INSERT INTO requests (type, email, fingerprint, label, received_at, due_at, note)"
                f" SELECT 'erasure', 'user' || i || '@example.com', 'fp' || i, 'u***@example.com',"
                f" {ago(postgresql, 'i % 45')}, {ago(postgresql, 'i % 45 - 30')}, ''"
                f" FROM {numbers(postgresql, OPEN)}"
            )
        )
        if postgresql:
            # as an operator guarding the database would set it for the service
            database = engine.url.database
            conn.execute(
                text(f"ALTER ROLE CURRENT_USER IN DATABASE \"{database}\" SET statement_timeout = '300ms'")
            )
    engine.dispose()


def test_a_big_register_is_read_in_small_whole_pages(service_database, tmp_path: Path):
    _, seeded = seed(service_database, tmp_path / "instance", ["ann@example.com"])
    fill(service_database)
    service = Service(service_database, tmp_path, PREFS_WORKERS="2").start()
    api = {"Authorization": f"Bearer {seeded.api_key}"}
    basic = {"Authorization": "Basic " + base64.b64encode(f"ops:{seeded.api_key}".encode()).decode()}
    tried, answered, server_errors, heaviest = 0, 0, 0, 0
    seen: list[int] = []
    recorded: list[int] = []
    try:
        for path in ("/admin", "/admin/charts/opt-outs.svg", "/admin/charts/sources.svg", "/admin/requests"):
            for _ in range(3):
                outcome = timed(service.base, "GET", path, headers=basic, timeout=30)
                tried += 1
                answered += outcome.status == 200
                server_errors += (outcome.status or 500) >= 500
                heaviest = max(heaviest, len(outcome.body))
        # the whole open register through the API, with requests recorded between pages
        cursor = None
        for number in range(OPEN // PAGE + 20):
            path = f"/api/v1/requests?status=open&limit={PAGE}" + (f"&cursor={cursor}" if cursor else "")
            outcome = timed(service.base, "GET", path, headers=api, timeout=30)
            tried += 1
            answered += outcome.status == 200
            server_errors += (outcome.status or 500) >= 500
            if outcome.status != 200:
                continue
            page = json.loads(outcome.body)
            seen += [item["id"] for item in page["items"]]
            made = timed(
                service.base,
                "POST",
                "/api/v1/requests",
                body=json.dumps({"type": "access", "email": f"new{number}@example.com"}),
                headers={**api, "Content-Type": "application/json"},
            )
            if made.status == 201:
                recorded.append(json.loads(made.body)["id"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        service.stop()
    # the fill made requests 1..OPEN, all open throughout the walk
    missed = len(set(range(1, OPEN + 1)) - set(seen))
    twice = len(seen) - len(set(seen))
    report(
        f"big register ({OPEN:,} open requests, {EVENTS:,} events)",
        tried,
        answered,
        missed + twice,
        server_errors,
        f"big register: {tried} pages, {answered} answered 200, {server_errors} 5xx; the API walk saw"
        f" {OPEN - missed:,} of the {OPEN:,} requests on file ({missed} missed, {twice} twice) and"
        f" {len(set(seen) & set(recorded))} of the {len(recorded)} recorded meanwhile;"
        f" heaviest overview page {heaviest:,} bytes",
    )
    assert server_errors == 0 and answered == tried, service.log()[-3000:]
    assert missed == 0 and twice == 0
    assert heaviest < MOST_BYTES
