"""Exports under load and cut short: whole, counted and consistent, or plainly not whole.

A mailer keeps what ``curl --fail -sS ... > list.csv`` wrote; it may trust a file whose
rows match ``X-Total-Count`` and whose length matches ``Content-Length``. These tests
export while changes are written, while clients hang up mid-stream, while the service's
workers are killed mid-send, and (PostgreSQL) while its database connections are cut.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from prefs.store import tallies
from tests.reliability.figures import report
from tests.reliability.harness import Service, seed, wait_until

pytestmark = pytest.mark.reliability

OUT = 20_000  # out of all marketing: the export
SPARE = 400  # in, to swap with
# an export larger than the kernel's socket buffers (4 MB each way here): a worker killed
# midway has part of it still to send
LARGE = 150_000
EXPORTERS = 6
KINDS = ("text/csv", "application/x-ndjson")


@dataclass
class Export:
    """What one export got: status, the headers that promise its size, and what arrived."""

    status: int | None
    count: str | None = None
    length: str | None = None
    body: bytes = b""
    cut: bool = False  # the connection ended before the promised length

    @property
    def rows(self) -> list[str]:
        lines = self.body.decode(errors="replace").splitlines()
        if self.body.startswith(b"email,"):
            return [line.split(",", 1)[0] for line in lines[1:]]
        return [json.loads(line)["email"] for line in lines if line.endswith("}")]

    @property
    def whole(self) -> bool:
        """Tell whether the export is all it says it is: every byte and every row."""
        return (
            self.status == 200
            and not self.cut
            and self.length == str(len(self.body))
            and self.count == str(len(self.rows))
        )


class _SmallWindow(http.client.HTTPConnection):
    """A connection with a small receive buffer: the server cannot send far ahead of the reader."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


def export(
    base: str,
    key: str,
    kind: str,
    read: int | None = None,
    pause: threading.Event | None = None,
    midway: list[str] | None = None,
) -> Export:
    """Export the list; read ``read`` bytes and hang up, or stop midway until ``pause``, if asked."""
    host, port = base.rsplit(":", 1)
    window = _SmallWindow if pause else http.client.HTTPConnection
    conn = window(host, int(port), timeout=30)
    try:
        headers = {"Authorization": f"Bearer {key}", "Accept": kind}
        conn.request("GET", "/api/v1/suppressions", headers=headers)
        response = conn.getresponse()
        got = Export(
            response.status, response.getheader("X-Total-Count"), response.getheader("Content-Length")
        )
        if read is not None:
            got.body = response.read(read)
            return got  # the caller hangs up
        if pause is not None and midway is not None:
            got.body = response.read(64 * 1024)
            midway.append(kind)
            pause.wait(30)
        try:
            got.body += response.read()
        except http.client.IncompleteRead as short:
            got.body += short.partial
            got.cut = True
        return got
    except (OSError, http.client.HTTPException):
        return Export(None)
    finally:
        conn.close()


def build(service_database: str, tmp_path: Path, size: int = OUT) -> tuple[str, list[str], list[str]]:
    """Seed the subscribers, take ``size`` of them out of all marketing; return the key, out, in."""
    out = [f"out{i:06d}@example.com" for i in range(size)]
    spare = [f"in{i:04d}@example.com" for i in range(SPARE)]
    _, seeded = seed(service_database, tmp_path / "instance", out + spare)
    engine = create_engine(service_database)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # counted once for the statement, not a row at a time
            conn.execute(text(f"SELECT set_config('{tallies.BULK_SETTING}', 'on', true)"))
        conn.execute(
            text(
                "UPDATE subscribers SET left_all_reason = 'unsubscribed', version = 1, left_all_version = 1,"
                " left_all_at = CURRENT_TIMESTAMP WHERE email LIKE 'out%'"
            )
        )
    engine.dispose()
    return seeded.api_key, out, spare


def deleted_files_open(service: Service) -> int:
    """Count the deleted files the workers hold open (gunicorn's heartbeat, and unsent exports)."""
    held = 0
    for pid in service.workers():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                held += os.readlink(fd).endswith("(deleted)")
            except OSError:
                continue
    return held


def test_exports_while_changes_are_written_and_clients_hang_up(service_database, tmp_path):
    key, out, spare = build(service_database, tmp_path)
    api = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    service = Service(service_database, tmp_path, PREFS_WORKERS="2", PREFS_THREADS="8").start()
    stop = threading.Event()
    swaps: list[int | None] = []
    exports: list[Export] = []
    hung_up: list[Export] = []
    lock = threading.Lock()

    def swapper() -> None:
        # one transaction takes one address off the list and puts another on: the list's
        # length never changes, so every consistent export holds exactly OUT rows
        rng = random.Random(9)
        listed, unlisted = list(out), list(spare)
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            leaving = listed.pop(rng.randrange(len(listed)))
            joining = unlisted.pop(rng.randrange(len(unlisted)))
            events = [{"type": "resubscribe", "email": leaving}, {"type": "unsubscribe", "email": joining}]
            conn = http.client.HTTPConnection(*service.base.rsplit(":", 1), timeout=30)
            try:
                conn.request("POST", "/api/v1/events", body=json.dumps({"events": events}), headers=api)
                status = conn.getresponse().status
            except (OSError, http.client.HTTPException):
                status = None
            finally:
                conn.close()
            swaps.append(status)
            if status == 200:
                listed.append(joining)
                unlisted.append(leaving)
            else:  # not known to be either way: leave both out of later swaps
                stop.wait(0.05)

    def exporter(n: int) -> None:
        for run in range(3):
            got = export(service.base, key, KINDS[(n + run) % 2])
            with lock:
                exports.append(got)
            # a client that hangs up after the first few kilobytes
            cut = export(service.base, key, KINDS[n % 2], read=16 * 1024)
            with lock:
                hung_up.append(cut)

    baseline = deleted_files_open(service)
    writer = threading.Thread(target=swapper)
    writer.start()
    threads = [threading.Thread(target=exporter, args=(n,)) for n in range(EXPORTERS)]
    try:
        wait_until(lambda: len(swaps) >= 5, 30, "the first swaps")
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        swapped_during = len(swaps)
        stop.set()
        writer.join(30)
        wait_until(lambda: deleted_files_open(service) == baseline, 10, "every export's file to be closed")
        after = export(service.base, key, "text/csv")
    finally:
        stop.set()
        service.stop()
    whole = [e for e in exports if e.whole]
    wrong = [e for e in exports if not e.whole or len(e.rows) != OUT or len(set(e.rows)) != OUT]
    server_errors = sum(1 for s in [*swaps, *(e.status for e in exports)] if s is not None and s >= 500)
    report(
        "exports during writes, clients hanging up",
        len(exports),
        sum(1 for e in exports if e.status == 200),
        len(wrong),
        server_errors,
        f"exports: {len(exports)} of {OUT:,} rows during {swapped_during} swaps, {len(whole)} whole and"
        f" consistent, {len(wrong)} not ({sorted({len(e.rows) for e in wrong})[:5]} rows);"
        f" {len(hung_up)} clients hung up after 16 kB; {server_errors} 5xx",
    )
    assert server_errors == 0 and not wrong
    assert swapped_during >= 10  # the list really changed while it was exported
    assert after.whole and len(after.rows) == OUT


def test_an_export_cut_short_never_looks_whole(service_database, tmp_path):
    key, _, _ = build(service_database, tmp_path, LARGE)
    service = Service(service_database, tmp_path, PREFS_WORKERS="2", PREFS_THREADS="4").start()
    results: list[Export] = []
    try:
        for _ in range(2):
            results += exports_with_workers_killed(service, key)
        if service_database.startswith("postgresql"):
            results += exports_with_connections_cut(service, service_database, key)
    finally:
        service.stop()
    cut_or_refused = [e for e in results if not e.whole]
    # a 200 that is not all it says, yet ended as if it were: what a mailer would keep unawares
    looks_whole = [e for e in cut_or_refused if e.status == 200 and not e.cut]
    server_errors = sum(1 for e in results if e.status is not None and e.status >= 500)
    report(
        "exports cut short (workers killed mid-send, connections cut)",
        len(results),
        sum(1 for e in results if e.status == 200),
        len(looks_whole),
        server_errors,
        f"cut exports: {len(results)} tried, {len(results) - len(cut_or_refused)} whole,"
        f" {sum(1 for e in cut_or_refused if e.cut)} cut and told by Content-Length,"
        f" {sum(1 for e in cut_or_refused if e.status == 503)} refused with 503,"
        f" {len(looks_whole)} cut yet looking whole",
    )
    assert not looks_whole
    # a whole one is right; a cut one says so; nothing else
    for e in results:
        assert e.whole or e.cut or e.status == 503, (e.status, e.count, e.length, len(e.body))
        if e.whole:
            assert len(e.rows) == LARGE
    assert any(e.cut for e in results)  # the kills did land midway


def exports_with_workers_killed(service: Service, key: str) -> list[Export]:
    """Kill every worker while two slow readers are midway through their exports."""
    pause = threading.Event()
    got: list[Export] = []
    midway: list[str] = []

    def read(kind: str) -> None:
        got.append(export(service.base, key, kind, pause=pause, midway=midway))

    readers = [threading.Thread(target=read, args=(kind,)) for kind in KINDS]
    for reader in readers:
        reader.start()
    wait_until(lambda: len(midway) == len(KINDS), 30, "both readers to be midway")
    for pid in service.workers():
        os.kill(pid, signal.SIGKILL)
    pause.set()
    for reader in readers:
        reader.join(60)
    wait_until(lambda: len(service.workers()) == 2, 30, "the master to start new workers")
    return got


def exports_with_connections_cut(service: Service, database_url: str, key: str) -> list[Export]:
    """Export while every connection reading the list is terminated, until some were cut."""
    engine = create_engine(database_url)
    results: list[Export] = []
    stop = threading.Event()
    cut = [0]

    def terminator() -> None:
        with engine.connect() as conn:
            while not stop.wait(0.005):
                cut[0] += conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " AND query LIKE 'SELECT s.id, s.email%'"
                    )
                ).scalar()
                conn.commit()

    killer = threading.Thread(target=terminator)
    killer.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (cut[0] < 3 or len(results) < 6):
            results.append(export(service.base, key, KINDS[len(results) % 2]))
    finally:
        stop.set()
        killer.join(10)
        engine.dispose()
    assert cut[0] >= 1, "no export's connection was cut"
    return results


def test_many_exports_at_once_leave_the_worker_its_connections(service_database, tmp_path):
    # one worker: 16 threads share its pool of 5 connections (PREFS_DB_POOL_SIZE)
    key, _, _ = build(service_database, tmp_path, LARGE)
    service = Service(service_database, tmp_path, PREFS_WORKERS="1", PREFS_THREADS="16").start()
    api = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    check = json.dumps({"topic": "news", "recipients": ["out000001@example.com", "someone@example.com"]})
    stop = threading.Event()
    exports: list[Export] = []
    checks: list[tuple[int | None, float]] = []

    def exporter(n: int) -> None:
        while not stop.is_set():
            exports.append(export(service.base, key, KINDS[n % 2]))

    def checker() -> None:
        while not stop.wait(0.05):
            started = time.monotonic()
            conn = http.client.HTTPConnection(*service.base.rsplit(":", 1), timeout=30)
            try:
                conn.request("POST", "/api/v1/check", body=check, headers=api)
                status = conn.getresponse().status
            except (OSError, http.client.HTTPException):
                status = None
            finally:
                conn.close()
            checks.append((status, time.monotonic() - started))

    threads = [threading.Thread(target=exporter, args=(n,)) for n in range(8)]
    threads += [threading.Thread(target=checker) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(exports) >= 16, 120, "16 exports")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
        service.stop()
    statuses = [e.status for e in exports] + [status for status, _ in checks]
    server_errors = sum(1 for s in statuses if s is None or s >= 500)
    slowest = max(seconds for _, seconds in checks)
    report(
        "8 exports at once on one worker, checks beside them",
        len(exports) + len(checks),
        sum(1 for s in statuses if s == 200),
        sum(1 for e in exports if e.status == 200 and not e.whole),
        server_errors,
        f"exports at once: {len(exports)} of {LARGE:,} rows, {sum(1 for e in exports if e.whole)} whole;"
        f" {len(checks)} checks beside them, slowest {slowest:.2f} s; {server_errors} 5xx or no answer",
    )
    assert server_errors == 0
    assert all(e.whole and len(e.rows) == LARGE for e in exports)
    assert slowest < 2.0  # a check never waited out the pool's timeout
