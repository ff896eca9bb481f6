"""The SMTP receiver under the faults of its own kind: a stop with opt-outs in flight, replayed
DKIM signatures, and senders whose DNS hangs.

A SIGTERM goes to a real ``flask --app prefs smtpd`` process while its opt-outs wait on a
locked database; every message answered 250 must be on file afterwards, and none may be left
without an answer. Replays and hung DNS go to a receiver in this process, whose resolver the
test injects.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from prefs import create_app
from prefs.domain import ledger
from prefs.domain.tokens import Tokens
from prefs.extensions import db
from prefs.mail import auth as mailauth
from prefs.mail import smtpd as receiver
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import ROOT, free_port, seed, wait_until
from tests.test_smtpd import REPLAYS, HungDNS, dkim_key, dns_for  # noqa: F401 (dkim_key: a fixture)

pytestmark = pytest.mark.reliability

MAILBOX = "unsubscribe@prefs.example"
IN_FLIGHT = 6


def hold_lock(url: str) -> Any:
    """Hold the database's write lock from another connection; return that connection."""
    if url.startswith("sqlite"):
        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        return holder
    import psycopg

    holder = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=False)
    holder.execute("LOCK TABLE subscribers, preferences, events IN ACCESS EXCLUSIVE MODE")
    return holder


def greeted(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(100).startswith(b"220")
    except OSError:
        return False


def test_sigterm_answers_every_opt_out_in_flight(service_database, tmp_path):
    people = [f"p{i}@example.com" for i in range(IN_FLIGHT)]
    app, seeded = seed(service_database, tmp_path / "instance", people)
    tokens = Tokens(TEST_KEYS)
    port = free_port()
    env = {
        **os.environ,
        "PREFS_DATABASE_URL": service_database,
        "PREFS_SECRET_KEYS": ",".join(TEST_KEYS),
        "PREFS_INSTANCE_PATH": str(tmp_path / "instance"),
        "PREFS_UNSUBSCRIBE_MAILTO": MAILBOX,
        "PREFS_BASE_URL": "https://prefs.example.com",
    }
    log_path = tmp_path / "smtpd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "prefs", "smtpd", "--listen", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    answers: dict[int, int | None] = {}
    idle_said = b""
    try:
        wait_until(lambda: process.poll() is None and greeted(port), 20, "smtpd's greeting")
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.recv(200)
        holder = hold_lock(service_database)

        def send(i: int) -> None:
            token = tokens.unsubscribe(seeded.public_ids[i], "news")
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                    client.sendmail(
                        "x@elsewhere.example",
                        [f"unsubscribe+{token}@prefs.example"],
                        b"Subject: x\r\n\r\nbye\r\n",
                    )
                answers[i] = 250
            except smtplib.SMTPResponseException as err:
                answers[i] = err.smtp_code
            except (OSError, smtplib.SMTPException):
                answers[i] = None

        senders = [threading.Thread(target=send, args=(i,)) for i in range(IN_FLIGHT)]
        try:
            for thread in senders:
                thread.start()
            time.sleep(1.0)  # every message is in DATA, waiting on the lock
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        finally:
            holder.rollback()
            holder.close()
        for thread in senders:
            thread.join(25)
        idle_said = idle.recv(200)
        idle.close()
        exit_code = process.wait(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    with app.app_context():
        session = db.session()
        recorded = {i: not ledger.verdict_for(session, people[i], "news").allowed for i in range(IN_FLIGHT)}
        db.session.remove()
        db.engine.dispose()
    acknowledged = [i for i, code in answers.items() if code == 250]
    lost = [i for i in acknowledged if not recorded[i]]
    unanswered = [i for i in range(IN_FLIGHT) if answers.get(i) is None]
    report(
        "SIGTERM with opt-outs in flight (smtpd)",
        IN_FLIGHT,
        len(acknowledged),
        len(lost),
        len(unanswered),
        f"smtpd SIGTERM: {IN_FLIGHT} opt-outs waiting on a locked database, "
        f"{len(acknowledged)} answered 250, "
        f"{len(lost)} of them lost, {len(unanswered)} left without an answer, the idle client told "
        f"{idle_said[:9].decode(errors='replace')!r}, exit code {exit_code}",
    )
    assert not lost, (lost, log_path.read_text()[-3000:])
    assert not unanswered, (answers, log_path.read_text()[-3000:])
    # each is answered: 250 once committed, or 451 where the lock outlasted the database's wait
    # (on PostgreSQL a write waits on a table lock for less than this test holds it)
    assert set(answers.values()) <= {250, 451}, answers
    if service_database.startswith("sqlite"):
        assert len(acknowledged) == IN_FLIGHT, (answers, log_path.read_text()[-3000:])
    assert idle_said.startswith(b"421 4.3.2"), idle_said
    assert exit_code == 0, log_path.read_text()[-3000:]


def test_replays_and_hung_dns_unsubscribe_nobody(service_database, tmp_path, monkeypatch, dkim_key):  # noqa: F811
    private, public = dkim_key
    app, seeded = seed(service_database, tmp_path / "instance", ["victim@victim.example", "ann@example.com"])
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path / "instance"))
    monkeypatch.setattr(mailauth, "CHECK_DEADLINE", 1.0)
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": service_database,
            "SECRET_KEYS": TEST_KEYS,
            "UNSUBSCRIBE_MAILTO": MAILBOX,
        }
    )
    resolver = HungDNS(dns_for(public).records)
    port = free_port()
    running = receiver.start(app, "127.0.0.1", port, resolver=resolver)
    replies: dict[str, int | None] = {}

    def send(name: str, mail_from: str, rcpt: str, raw: bytes) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
                client.sendmail(mail_from, [rcpt], raw)
            replies[name] = 250
        except smtplib.SMTPResponseException as err:
            replies[name] = err.smtp_code
        except (OSError, smtplib.SMTPException):
            replies[name] = None

    started = time.monotonic()
    try:
        for name, make in REPLAYS.items():
            send(f"replay: {name}", "bounce@victim.example", MAILBOX, make(private))
        hung = [
            threading.Thread(
                target=send,
                args=(
                    f"hung DNS {i}",
                    f"a{i}@slow.example",
                    MAILBOX,
                    f"From: v{i}@slow.example\r\n\r\nx\r\n".encode(),
                ),
            )
            for i in range(receiver.WORKERS * 3)
        ]
        for thread in hung:
            thread.start()
        time.sleep(0.3)
        token = Tokens(TEST_KEYS).unsubscribe(seeded.public_ids[1], "news")
        send(
            "genuine token",
            "x@elsewhere.example",
            f"unsubscribe+{token}@prefs.example",
            b"Subject: x\r\n\r\nbye\r\n",
        )
        for thread in hung:
            thread.join(15)
    finally:
        resolver.release.set()
        running.stop(drain=5)
    took = time.monotonic() - started
    # each hung sender is answered at the deadline (1 s here), whatever its DNS does
    with app.app_context():
        session = db.session()
        victim_allowed = ledger.verdict_for(session, "victim@victim.example", "news").allowed
        ann_allowed = ledger.verdict_for(session, "ann@example.com", "news").allowed
        db.session.remove()
        db.engine.dispose()
    attacks = {name: code for name, code in replies.items() if name != "genuine token"}
    taken = sum(1 for code in replies.values() if code == 250)
    unanswered = [name for name, code in replies.items() if code is None]
    hung_codes = sorted({code for name, code in attacks.items() if name.startswith("hung")}, key=str)
    report(
        "replayed DKIM signatures and hung DNS (smtpd)",
        len(replies),
        taken,
        int(ann_allowed),
        len(unanswered),
        f"smtpd: {len(REPLAYS)} replayed genuine DKIM signatures and {len(hung)} senders on hung DNS: "
        f"victim {'still subscribed' if victim_allowed else 'UNSUBSCRIBED'}, "
        f"hung senders answered {hung_codes}, "
        f"a token's opt-out sent meanwhile {'recorded' if not ann_allowed else 'LOST'}, {took:.1f} s in all",
    )
    assert victim_allowed
    assert not ann_allowed
    assert not unanswered, unanswered
    assert hung_codes == [451], hung_codes
    assert took < 8, took


def test_a_connection_flood_from_one_address_shuts_nobody_else_out(service_database, tmp_path, monkeypatch):
    flood = 300
    app, seeded = seed(service_database, tmp_path / "instance", ["ann@example.com"])
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": service_database,
            "SECRET_KEYS": TEST_KEYS,
            "UNSUBSCRIBE_MAILTO": MAILBOX,
        }
    )
    port = free_port()
    running = receiver.start(app, "127.0.0.1", port, resolver=HungDNS())
    held: list[socket.socket] = []
    greetings: dict[bytes, int] = {}
    try:
        for _ in range(flood):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(sock)
            code = sock.recv(200)[:3]
            greetings[code] = greetings.get(code, 0) + 1
        token = Tokens(TEST_KEYS).unsubscribe(seeded.public_ids[0], "news")
        started = time.monotonic()
        # another sender, from another address
        with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0)) as client:
            client.sendmail(
                "x@elsewhere.example", [f"unsubscribe+{token}@prefs.example"], b"Subject: x\r\n\r\nbye\r\n"
            )
        took = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
        running.stop(drain=5)
    with app.app_context():
        ann_allowed = ledger.verdict_for(db.session(), "ann@example.com", "news").allowed
        db.session.remove()
        db.engine.dispose()
    report(
        "connection flood from one address (smtpd)",
        flood + 1,
        1 if not ann_allowed else 0,
        int(ann_allowed),
        0,
        f"smtpd: {flood} connections from one address: {greetings.get(b'220', 0)} greeted, "
        f"{greetings.get(b'421', 0)} told 421; an opt-out from another address meanwhile "
        f"{'recorded' if not ann_allowed else 'LOST'} in {took:.2f} s",
    )
    assert greetings.get(b"220", 0) == receiver.MAX_SESSIONS_PER_CLIENT, greetings
    assert greetings.get(b"421", 0) == flood - receiver.MAX_SESSIONS_PER_CLIENT, greetings
    assert not ann_allowed
