"""Outgoing mail: the SMTP URL, the message, real delivery, and the log fallback."""

import logging
import smtplib
import ssl

import pytest

from prefs.mail import outbound as mail
from prefs.mail.outbound import Mailer, MailError, SmtpServer, compose, parse_smtp_url
from tests.smtp import PASSWORD, USER, LoopbackSMTP, free_port, self_signed_certificate

TOKEN = "Ab3dEf6hIj9kLm2nOp.news.c1.aw5y2Q.kkITaLuds3Mlu7qaxyI7D7Dr5sM"


def message(to="ann@example.com", url=f"https://prefs.example.com/p/{TOKEN}"):
    return compose(
        "Example <no-reply@example.com>", to, "Your preferences", f"Open {url}\n", f"<a href='{url}'>x</a>"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", SmtpServer("mail.example.com", 25)),
        (
            "smtp://u:p@mail.example.com:2525",
            SmtpServer("mail.example.com", 2525, username="u", password="p"),
        ),
        ("smtps://u:p%40ss@mail.example.com", SmtpServer("mail.example.com", 465, True, False, "u", "p@ss")),
        ("smtp://mail.example.com?starttls=1", SmtpServer("mail.example.com", 587, starttls=True)),
        ("smtp://mail.example.com:25?starttls=1", SmtpServer("mail.example.com", 25, starttls=True)),
    ],
)
def test_smtp_urls_are_read(url, expected):
    assert parse_smtp_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://mail.example.com",
        "smtp://",
        "smtp://mail.example.com:port",
        "smtp://mail.example.com?tls=1",
        "smtp://mail.example.com?starttls=yes",
        "smtps://mail.example.com?starttls=1",
        "smtp://mail.example.com/path",
    ],
)
def test_malformed_smtp_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_smtp_url(url)


def test_the_message_is_text_with_an_html_alternative():
    msg = message()
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)).get_content() == f"Open https://prefs.example.com/p/{TOKEN}\n"
    assert "href" in msg.get_body(("html",)).get_content()
    assert msg["Message-ID"].endswith("@example.com>")
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "List-Unsubscribe" not in msg


def test_without_a_server_the_log_says_a_message_was_written_and_shows_no_address_or_token(caplog):
    caplog.set_level(logging.DEBUG, logger="prefs.mail.outbound")
    Mailer(None).send(message())
    assert "a***@example.com" in caplog.text
    assert "ann@example.com" not in caplog.text
    assert TOKEN not in caplog.text and TOKEN[:20] not in caplog.text
    assert "/p/Ab3dEf…" in caplog.text


def test_a_message_is_delivered_to_a_real_smtp_server_with_login(smtp_server):
    Mailer(parse_smtp_url(smtp_server.url)).send(message())
    [delivered] = smtp_server.inbox.wait_for(1)
    assert smtp_server.inbox.logins == [USER]
    assert smtp_server.inbox.envelopes == [("no-reply@example.com", ["ann@example.com"])]
    assert delivered["To"] == "ann@example.com"
    assert TOKEN in delivered.get_body(("plain",)).get_content()


def test_starttls_is_used_and_the_certificate_checked(tmp_path):
    certificate = self_signed_certificate(tmp_path)
    server = LoopbackSMTP(certificate)
    try:
        url = server.url + "?starttls=1"
        untrusting = Mailer(parse_smtp_url(url))
        with pytest.raises(MailError):
            untrusting.send(message())  # a certificate nobody vouched for is refused
        trusting = Mailer(parse_smtp_url(url))
        trusting.context = ssl.create_default_context(cafile=certificate[0])
        trusting.send(message())
        [delivered] = server.inbox.wait_for(1)
        assert delivered["To"] == "ann@example.com" and server.inbox.logins == [USER]
    finally:
        server.stop()


def test_a_wrong_password_is_a_mail_error_without_the_secret(smtp_server, caplog):
    server = parse_smtp_url(smtp_server.url.replace("s3cret", "wrong"))
    with pytest.raises(MailError):
        Mailer(server).send(message())
    assert PASSWORD not in caplog.text and "ann@example.com" not in caplog.text
    assert smtp_server.inbox.messages == []


def test_an_unreachable_server_is_a_mail_error_not_a_hang():
    server = SmtpServer("127.0.0.1", free_port())
    with pytest.raises(MailError):
        Mailer(server, timeout=2).send(message())


def test_tls_and_starttls_use_the_verifying_context(monkeypatch):
    calls = []

    class FakeSMTP:
        def __init__(self, host, port, timeout, context=None):
            calls.append(("connect", type(self).__name__, host, port, context))

        def starttls(self, context):
            calls.append(("starttls", context))

        def login(self, user, password):
            calls.append(("login", user))

        def send_message(self, msg):
            calls.append(("send", msg["To"]))

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class FakeSSL(FakeSMTP):
        pass

    monkeypatch.setattr(smtplib, "SMTP", FakeSMTP)
    monkeypatch.setattr(smtplib, "SMTP_SSL", FakeSSL)
    secure = Mailer(parse_smtp_url("smtps://u:p@mail.example.com"))
    secure.send(message())
    starttls = Mailer(parse_smtp_url("smtp://mail.example.com?starttls=1"))
    starttls.send(message())
    assert calls[0] == ("connect", "FakeSSL", "mail.example.com", 465, secure.context)
    assert calls[1:3] == [("login", "u"), ("send", "ann@example.com")]
    assert calls[3] == ("connect", "FakeSMTP", "mail.example.com", 587, None)
    assert calls[4] == ("starttls", starttls.context)
    assert calls[5] == ("send", "ann@example.com")
    assert secure.context.verify_mode.name == "CERT_REQUIRED" and secure.context.check_hostname


def test_redaction_keeps_the_start_of_each_token_only():
    text = f"see https://x.example/u/{TOKEN} and /p/{TOKEN}"
    assert mail.redacted(text) == "see https://x.example/u/Ab3dEf… and /p/Ab3dEf…"
