"""Forged and hostile mail to the unsubscribe mailbox, replayed against gunicorn and the SMTP receiver.

Every forged ``Authentication-Results`` and every stalling or crashing shape of issue 18 goes
to ``POST /api/v1/inbound`` on gunicorn and to the SMTP receiver on loopback; nobody's
preferences may change, every answer comes within the bound, never as a 5xx (API) or with
internals (SMTP), and a genuine opt-out sent between them is still recorded.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from prefs import create_app
from prefs.domain import ledger
from prefs.domain.tokens import Tokens
from prefs.extensions import db
from prefs.mail import smtpd as receiver
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import Service, free_port, seed, timed
from tests.test_api_inbound import HOSTILE, SMUGGLED
from tests.test_inbound import FORGERIES, OURS
from tests.test_smtpd import FakeDNS

pytestmark = pytest.mark.reliability

MAILBOX = "unsubscribe@prefs.example"
# seconds: each message is answered within this. The API takes milliseconds; the SMTP
# receiver's reading of DATA (aiosmtpd, line by line) takes about 4 us a line, so a 1 MiB
# message of empty lines takes about 1.7 s on an idle machine (others are served meanwhile)
BOUND = {"api": 2.0, "smtp": 5.0}
PEOPLE = ["victim@victim.example", "ann@example.com", "bob@example.com"]


def test_forged_and_hostile_mail_changes_nobody(service_database, tmp_path, monkeypatch):
    _, seeded = seed(service_database, tmp_path / "instance", PEOPLE)
    tokens = Tokens(TEST_KEYS)
    service = Service(
        service_database, tmp_path, PREFS_INBOUND_AUTHSERV_ID=OURS, PREFS_UNSUBSCRIBE_MAILTO=MAILBOX
    ).start()
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path / "instance"))
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": service_database,
            "SECRET_KEYS": TEST_KEYS,
            "UNSUBSCRIBE_MAILTO": MAILBOX,
            "INBOUND_AUTHSERV_ID": OURS,
        }
    )
    port = free_port()
    running = receiver.start(app, "127.0.0.1", port, resolver=FakeDNS())
    attacks = {**FORGERIES, **HOSTILE, **SMUGGLED}
    api = {"Content-Type": "message/rfc822", "Authorization": f"Bearer {seeded.api_key}"}
    answered: dict[str, list[tuple[int | None, float]]] = {"api": [], "smtp": []}
    try:
        for raw in attacks.values():
            outcome = timed(service.base, "POST", "/api/v1/inbound", body=raw, headers=api, timeout=30)
            answered["api"].append((outcome.status, outcome.elapsed))
            assert b"Traceback" not in outcome.body
            answered["smtp"].append(smtp_reply(port, raw))
        # genuine opt-outs between the attacks: one by the API, one by SMTP
        ann, bob = (tokens.unsubscribe(public_id, "news") for public_id in seeded.public_ids[1:])
        genuine = f"From: ann@example.com\r\nTo: {MAILBOX}\r\nSubject: unsubscribe-{ann}\r\n\r\nbye\r\n"
        genuine_api = timed(service.base, "POST", "/api/v1/inbound", body=genuine.encode(), headers=api)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(
                "bob@example.com", [f"unsubscribe+{bob}@prefs.example"], b"Subject: x\r\n\r\nbye\r\n"
            )
    finally:
        running.stop()
        service.stop()
    with app.app_context():
        session = db.session()
        states = {email: ledger.verdict_for(session, email, "news").allowed for email in PEOPLE}
        db.session.remove()
        db.engine.dispose()
    changed = [email for email in PEOPLE[:1] if not states[email]]
    lost = [email for email in PEOPLE[1:] if states[email]]
    api_5xx = [s for s, _ in answered["api"] if s is None or s >= 500]
    smtp_bad = [s for s, _ in answered["smtp"] if s is None]
    slowest = {surface: max(e for _, e in replies) for surface, replies in answered.items()}
    tried = len(attacks) * 2
    taken = sum(1 for replies in answered.values() for status, _ in replies if status in (200, 250))
    report(
        "forged and hostile mail (API and smtpd)",
        tried,
        taken,
        len(lost),
        len(api_5xx) + len(smtp_bad),
        f"forged mail: {len(attacks)} forgeries and hostile shapes, each to gunicorn and to smtpd: "
        f"{len(changed)} unsubscribed anyone, {tried - taken} refused with a 4xx/5xx code, "
        f"{taken} taken and ignored, slowest answer {slowest['api']:.2f} s (API), "
        f"{slowest['smtp']:.2f} s (SMTP); "
        f"2 genuine opt-outs between them, {2 - len(lost)} recorded",
    )
    assert genuine_api.status == 200
    assert not changed, changed
    assert not lost, lost
    assert not api_5xx and not smtp_bad, (api_5xx, smtp_bad)
    for surface, replies in answered.items():
        worst = max(zip((e for _, e in replies), attacks, strict=True))
        assert worst[0] < BOUND[surface], (surface, worst)


def smtp_reply(port: int, raw: bytes) -> tuple[int | None, float]:
    """Send one message to the receiver; return its final reply code (None: no clean reply)."""
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("mail.evil.example")
            client.mail("mallory@evil.example")
            client.rcpt(MAILBOX)
            code, text = client.data(raw)
    except smtplib.SMTPDataError as err:
        code, text = err.smtp_code, err.smtp_error
    except (OSError, smtplib.SMTPException):
        return None, time.monotonic() - started
    assert b"Error: (" not in text and b"Traceback" not in text, text
    return code, time.monotonic() - started
