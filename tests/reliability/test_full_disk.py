"""A full disk under what the service writes besides the database: metrics and logs.

The metrics folder (``PROMETHEUS_MULTIPROC_DIR``) sits on a 1 MB tmpfs filled to its
last page, before the service starts or while it serves. Under one-click load every
committed opt-out is answered, every worker lives on, and ``/metrics`` still answers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from prefs.domain.tokens import Tokens
from prefs.models import Preference, Subscriber
from tests.conftest import TEST_KEYS
from tests.disks import fill, small_disk
from tests.reliability.figures import report
from tests.reliability.harness import FORM, ONE_CLICK_BODY, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

REQUESTS = 300
CLIENTS = 8


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """Return a folder on a 1 MB tmpfs of its own."""
    with small_disk(tmp_path / "small-disk") as folder:
        yield folder


def opted_out(database_url: str) -> set[str]:
    """Return the public ids recorded as out of ``news``."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return set(
                conn.scalars(
                    select(Subscriber.public_id)
                    .join(Preference, Preference.subscriber_id == Subscriber.id)
                    .where(Preference.subscribed.is_(False))
                )
            )
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "when", ["before the start", "during load", "with the log on it too", "with the log on a closed pipe"]
)
def test_a_full_metrics_disk_kills_no_worker_and_costs_no_answer(service_database, tmp_path, disk, when):
    _, seeded = seed(
        service_database, tmp_path / "instance", (f"disk{i}@example.com" for i in range(REQUESTS))
    )
    tokens = Tokens(TEST_KEYS)
    links = [tokens.unsubscribe(pid, "news", "disk") for pid in seeded.public_ids]
    metrics = disk / "metrics"
    metrics.mkdir()
    service = Service(service_database, tmp_path, PROMETHEUS_MULTIPROC_DIR=str(metrics))
    reader = None
    if when == "with the log on it too":
        service.log_path = disk / "gunicorn.log"
    if when == "with the log on a closed pipe":
        service.log_path = tmp_path / "log-pipe"
        os.mkfifo(service.log_path)
        reader = os.open(service.log_path, os.O_RDONLY | os.O_NONBLOCK)  # so the service can open it
    if when == "before the start":
        fill(disk)
    try:
        service.start()
        if reader is not None:
            os.close(reader)  # from now on every line the service logs meets a broken pipe
        if when != "before the start":
            fill(disk)
        workers = sorted(service.workers())
        outcomes: dict[int, Outcome] = {}
        lock = threading.Lock()
        todo = iter(range(REQUESTS))
        deadline = time.monotonic() + 120

        def client() -> None:
            while time.monotonic() < deadline:
                with lock:
                    index = next(todo, None)
                if index is None:
                    return
                outcome = timed(service.base, "POST", f"/u/{links[index]}", body=ONE_CLICK_BODY, headers=FORM)
                with lock:
                    outcomes[index] = outcome

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(150)
        scrape = timed(service.base, "GET", "/metrics", timeout=10)
        after = sorted(service.workers())
        log = service.log() if when in ("before the start", "during load") else ""
    finally:
        service.stop()

    out = opted_out(service_database)
    acked = [i for i, o in outcomes.items() if o.status == 200]
    unanswered = [i for i, o in outcomes.items() if o.status is None]
    committed_unanswered = [i for i in unanswered if seeded.public_ids[i] in out]
    server_errors = [i for i, o in outcomes.items() if o.status is not None and o.status >= 500]
    lost = [i for i in acked if seeded.public_ids[i] not in out]
    report(
        f"metrics disk full {when}",
        REQUESTS,
        len(acked),
        len(lost),
        len(server_errors),
        f"full disk ({when}): {REQUESTS} one-clicks, {len(acked)} answered 200, "
        f"{len(unanswered)} unanswered ({len(committed_unanswered)} of them committed), "
        f"workers {'unchanged' if after == workers else f'{workers} -> {after}'}",
    )
    assert not committed_unanswered
    assert not lost
    assert len(outcomes) == REQUESTS
    assert len(acked) == REQUESTS, {o.status or o.error for o in outcomes.values()}
    assert after == workers  # not one worker died
    assert scrape.status == 200, (scrape.error, scrape.body[:300])
    body = scrape.body
    if when == "during load":
        # figures that found no room are counted where the count had room from the start
        # (how many depends on which worker had made which file before the disk filled)
        assert b"\nprefs_metrics_dropped_total " in body
    if when == "before the start":
        assert "metrics" in log and "dropped" in log
