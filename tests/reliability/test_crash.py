"""Worker crash: kill -9 a worker, then the master, under load; no acknowledged opt-out is lost."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, func, select, text

from prefs.domain.tokens import Tokens
from prefs.models import Event, Preference, Subscriber
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Outcome, Service, seed, timed, wait_until

pytestmark = pytest.mark.reliability

REQUESTS = 2000
CLIENTS = 8


def integrity(database_url: str) -> str:
    """Return SQLite's verdict on its own file."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return str(conn.execute(text("PRAGMA integrity_check")).scalar())
    finally:
        engine.dispose()


def recorded_opt_outs(database_url: str) -> tuple[set[str], dict[str, int]]:
    """Return who is recorded out of ``news``, and how many events each subscriber has."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            out = set(
                conn.scalars(
                    select(Subscriber.public_id)
                    .join(Preference, Preference.subscriber_id == Subscriber.id)
                    .where(Preference.subscribed.is_(False))
                )
            )
            events = dict(
                conn.execute(
                    select(Subscriber.public_id, func.count(Event.id))
                    .join(Event, Event.subscriber_id == Subscriber.id)
                    .group_by(Subscriber.public_id)
                ).all()
            )
    finally:
        engine.dispose()
    return out, events


def test_kill_a_worker_then_the_master_loses_no_acknowledged_opt_out(service_database, tmp_path):
    _, seeded = seed(
        service_database, tmp_path / "instance", (f"crash{i}@example.com" for i in range(REQUESTS))
    )
    tokens = Tokens(TEST_KEYS)
    links = [tokens.unsubscribe(pid, "news", "crash") for pid in seeded.public_ids]
    service = Service(service_database, tmp_path, PREFS_WORKERS="4", PREFS_THREADS="4").start()
    todo: queue.Queue[int] = queue.Queue()
    for index in range(REQUESTS):
        todo.put(index)
    outcomes: dict[int, Outcome] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def client() -> None:
        while time.monotonic() < deadline:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            outcome = timed(service.base, "POST", f"/u/{links[index]}", body=ONE_CLICK_BODY, headers=FORM)
            with lock:
                outcomes[index] = outcome
            if outcome.status is None:
                time.sleep(0.05)  # refused: the service is down; try the next one a little later

    def acknowledged() -> int:
        with lock:
            return sum(1 for o in outcomes.values() if o.status is not None and 200 <= o.status < 300)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: acknowledged() >= 400, 60, "400 acknowledged opt-outs")
        service.kill_worker()
        wait_until(lambda: acknowledged() >= 1000, 60, "1000 acknowledged opt-outs")
        service.kill_master()
        if service_database.startswith("sqlite"):
            assert integrity(service_database) == "ok"
        service.start()
    finally:
        for thread in threads:
            thread.join(150)
    try:
        assert len(outcomes) == REQUESTS
        acked = [i for i, o in outcomes.items() if o.status is not None and 200 <= o.status < 300]
        refused = [i for i, o in outcomes.items() if o.status is None]
        server_errors = [i for i, o in outcomes.items() if o.status is not None and o.status >= 500]
        assert not server_errors, {outcomes[i].status for i in server_errors}
        assert len(acked) + len(refused) == REQUESTS, {o.status for o in outcomes.values()}

        # after the restart: every acknowledged opt-out is on file, once
        out, events = recorded_opt_outs(service_database)
        lost = [i for i in acked if seeded.public_ids[i] not in out]
        # a replay answers as the first call did, and records nothing more
        with ThreadPoolExecutor(CLIENTS) as pool:
            replays = list(
                pool.map(
                    lambda i: timed(
                        service.base, "POST", f"/u/{links[i]}", body=ONE_CLICK_BODY, headers=FORM
                    ),
                    acked,
                )
            )
        changed_answer = [i for i, o in zip(acked, replays, strict=True) if o.status != outcomes[i].status]
        out_after, events_after = recorded_opt_outs(service_database)
    finally:
        service.stop()
    if service_database.startswith("sqlite"):
        assert integrity(service_database) == "ok"
    report(
        "worker and master kill -9",
        REQUESTS,
        len(acked),
        len(lost),
        len(server_errors),
        f"crash: {REQUESTS} sent, {len(acked)} acknowledged, {len(lost)} lost, "
        f"{len(refused)} refused during the kill window",
    )
    assert not lost
    assert not changed_answer
    assert out_after == out and events_after == events
    assert all(count == 1 for count in events.values())
    assert len(acked) >= 1000
