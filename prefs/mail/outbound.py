"""Send transactional mail over SMTP, or write a redacted note of it to the log."""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

from ..domain.addresses import mask

log = logging.getLogger(__name__)

SCHEMES = {"smtp": 25, "smtps": 465}
STARTTLS_PORT = 587
# a link's token: never written to the log whole
_TOKEN = re.compile(r"(/[up]/)([A-Za-z0-9_-]{6})[A-Za-z0-9._~-]+")


class MailError(Exception):
    """The message could not be handed to the SMTP server."""


@dataclass(frozen=True, slots=True)
class SmtpServer:
    """Where and how to hand over outgoing mail."""

    host: str
    port: int
    tls: bool = False
    starttls: bool = False
    username: str | None = None
    password: str | None = None


def parse_smtp_url(url: str) -> SmtpServer:
    """Read ``smtp://user:pass@host:port``, ``smtps://…`` or ``smtp://…?starttls=1``; raise ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError("must start with smtp:// or smtps://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    if not parts.hostname:
        raise ValueError("needs a host, as in smtp://user:pass@mail.example.com:587")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"starttls"}
    if unknown or parts.path not in ("", "/") or parts.fragment:
        raise ValueError("takes only ?starttls=1 after the host and port")
    flag = query.get("starttls", ["0"])[-1]
    if flag not in ("0", "1"):
        raise ValueError("takes starttls=1 or starttls=0")
    starttls = flag == "1"
    if starttls and parts.scheme == "smtps":
        raise ValueError("uses TLS already with smtps://; starttls=1 is for smtp://")
    default_port = STARTTLS_PORT if starttls else SCHEMES[parts.scheme]
    return SmtpServer(
        host=parts.hostname,
        port=port or default_port,
        tls=parts.scheme == "smtps",
        starttls=starttls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def check_sender(sender: str) -> str:
    """Return a From address such as ``Example <no-reply@example.com>``; raise ValueError."""
    _, address = parseaddr(sender)
    if "@" not in address or any(c in sender for c in "\r\n"):
        raise ValueError("must be an address such as 'Example <no-reply@example.com>'")
    return sender


def compose(sender: str, recipient: str, subject: str, text: str, html: str) -> EmailMessage:
    """Build a message of plain text with an HTML alternative."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=parseaddr(sender)[1].rpartition("@")[2] or None)
    # an answer to the recipient's own request (RFC 3834): no auto-replies to it
    message["Auto-Submitted"] = "auto-replied"
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def redacted(text: str) -> str:
    """Return the text with link tokens cut short, fit for the log."""
    return _TOKEN.sub(r"\1\2…", text)


class Mailer:
    """Hand messages to the configured SMTP server, or log that they were written."""

    def __init__(self, server: SmtpServer | None, timeout: float = 10.0) -> None:
        self.server = server
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None

    @property
    def context(self) -> ssl.SSLContext:
        """Return the TLS context that checks the server's certificate, made when first needed."""
        # loading the system's certificates takes tens of milliseconds: not at every app start
        if self._context is None:
            self._context = ssl.create_default_context()
        return self._context

    @context.setter
    def context(self, context: ssl.SSLContext) -> None:
        self._context = context

    def send(self, message: EmailMessage) -> None:
        """Send one message; raise ``MailError`` when the server cannot take it."""
        recipient = mask(parseaddr(str(message["To"]))[1])
        if self.server is None:
            log.info("mail to %s written to the log (PREFS_SMTP_URL is not set)", recipient)
            body = message.get_body(("plain",))
            if body is not None and log.isEnabledFor(logging.DEBUG):
                # only a masked address and shortened tokens: nothing to identify anyone by
                log.debug("mail to %s:\n%s", recipient, redacted(body.get_content()))
            return
        try:
            with self._connect() as smtp:
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as err:
            log.warning("mail to %s not sent: %s", recipient, type(err).__name__)
            raise MailError("the mail server did not take the message") from None
        log.info("mail to %s handed to %s:%d", recipient, self.server.host, self.server.port)

    def _connect(self) -> smtplib.SMTP:
        server = self.server
        assert server is not None
        smtp: smtplib.SMTP
        if server.tls:
            smtp = smtplib.SMTP_SSL(server.host, server.port, timeout=self.timeout, context=self.context)
        else:
            smtp = smtplib.SMTP(server.host, server.port, timeout=self.timeout)
        try:
            if server.starttls:
                smtp.starttls(context=self.context)
            if server.username is not None:
                smtp.login(server.username, server.password or "")
        except BaseException:
            smtp.close()
            raise
        return smtp
