"""``flask --app prefs smtpd``: an SMTP receiver for the unsubscribe mailbox, fed to ``inbound``.

It listens where the internet may reach it, so it takes mail only for the mailbox
(``PREFS_UNSUBSCRIBE_MAILTO`` and its ``+<token>`` forms), a few recipients and 1 MiB at a
time, believes no ``Authentication-Results`` that came in a message (it evaluates SPF, DKIM
and DMARC itself, ``mailauth``), and reads each message in a worker thread so one hostile
message never stalls the other clients. DNS is asked from threads of its own, within
``mailauth.CHECK_DEADLINE``: a sender whose DNS hangs gets ``451 4.4.3``, never an
unproven opt-out, and holds up no token's. A fault on our side answers ``451 4.3.0``: the
sender keeps the opt-out and tries again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from flask import Flask

from ..domain import inbound, privacy
from ..errors import InvalidMessage, MessageTooLarge, TryLater
from ..extensions import session
from ..ops import logs
from ..web.links import tokens
from . import auth as mailauth

log = logging.getLogger(__name__)

MAX_MESSAGE = inbound.MAX_MESSAGE
MAX_RECIPIENTS = 10
# threads that read messages and write the database, and threads that wait on DNS: a sender
# whose DNS hangs holds one of the latter, never one a token's opt-out needs
WORKERS = 4
DNS_WORKERS = 8
# clients connected at once: each holds a socket and a task until aiosmtpd's idle timeout
# (five minutes a command, as RFC 5321 asks), so one address may hold only a share of them
MAX_SESSIONS = 200
MAX_SESSIONS_PER_CLIENT = 20
# lines of DATA read before the event loop serves the other clients
FAIR_LINES = 256

TRY_LATER = "451 4.3.0 temporary local problem, please try again later"
TOO_LARGE = "552 5.3.4 the message is larger than this host accepts"
DNS_LATE = "451 4.4.3 the sender's DNS did not answer in time, please try again later"
GOODBYE = "421 4.3.2 this host is shutting down, please try again later"
BUSY = "421 4.7.0 too many connections, please try again later"
# seconds a stop waits for the messages being received and judged: longer than a sender
# check, shorter than a service manager's patience (systemd waits 90 s)
DRAIN_SECONDS = 30.0


class UnsubscribeHandler:
    """Take each message for the unsubscribe address and honour what it asks."""

    def __init__(
        self,
        app: Flask,
        mailbox: str,
        resolver: mailauth.Resolver,
        pool: ThreadPoolExecutor,
        dns_pool: ThreadPoolExecutor,
    ) -> None:
        self.app = app
        self.mailbox = mailbox
        self.resolver = resolver
        self.pool = pool
        self.dns_pool = dns_pool

    async def handle_RCPT(
        self, server: Any, smtp_session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if not inbound.is_our_mailbox(address, self.mailbox):
            return "550 5.1.1 no such mailbox here: this host receives unsubscribe requests only"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, smtp_session: Any, envelope: Any) -> str:
        peer = smtp_session.peer[0] if isinstance(smtp_session.peer, tuple) else str(smtp_session.peer)
        check = mailauth.SenderCheck(
            self.resolver,
            peer,
            str(smtp_session.host_name or ""),
            str(envelope.mail_from or ""),
            self.mailbox,
        )
        raw = envelope.original_content or b""
        recipients = list(envelope.rcpt_tos)
        loop = asyncio.get_running_loop()
        try:
            request = await loop.run_in_executor(self.pool, inbound.read_request, raw, recipients)
            proven = False
            if request.needs_proof:
                proven = await asyncio.wait_for(
                    loop.run_in_executor(self.dns_pool, _proven, check, request),
                    mailauth.CHECK_DEADLINE,
                )
            outcome = await loop.run_in_executor(self.pool, self._honour, request, proven)
        except MessageTooLarge:
            return TOO_LARGE
        except InvalidMessage as err:
            return f"550 5.6.0 {err}"
        except TryLater as err:
            return f"451 4.4.3 {err}"
        except TimeoutError:
            return DNS_LATE
        except Exception as err:  # our database or our code: the sender must keep the opt-out and retry
            log.error("inbound mail: not recorded, answered 451 (%s)", type(err).__name__)
            return TRY_LATER
        log.info("inbound mail: %s (%s)", outcome.action, outcome.reason)
        # accepted either way: a refusal would bounce to someone who only asked to leave
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        log.error("inbound mail: SMTP session failed (%s)", type(error).__name__)
        return TRY_LATER

    def _honour(self, request: inbound.Request, proven: bool) -> inbound.Outcome:
        with self.app.app_context():
            return inbound.honour(session(), tokens(), request, proven)


def _proven(check: mailauth.SenderCheck, request: inbound.Request) -> bool:
    """Run the sender check, its DNS questions refused past the deadline."""
    assert request.message is not None and request.sender is not None
    bounded = dataclasses.replace(check, resolver=mailauth.Deadline(check.resolver, mailauth.CHECK_DEADLINE))
    return bounded(request.message, request.sender.rpartition("@")[2])


class _Server(SMTP):
    """aiosmtpd's SMTP, fair to other clients, with the size refusals' enhanced code (RFC 3463),
    known to its controller while connected so that a stop can drain it."""

    def __init__(self, handler: Any, sessions: set[_Server], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sessions = sessions
        # from DATA to its answer: a stop waits for this message rather than lose it
        self.receiving = False
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        same = sum(1 for other in self.sessions if other.client == self.client)
        if len(self.sessions) >= MAX_SESSIONS or same >= MAX_SESSIONS_PER_CLIENT:
            # said before aiosmtpd's greeting, which the closed transport then drops
            self._writer.write(f"{BUSY}\r\n".encode())
            transport.close()
            return
        self.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.sessions.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        self.receiving = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.receiving = False

    def goodbye(self) -> None:
        """Tell the client to come back later (RFC 5321 section 3.8) and close the connection."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(f"{GOODBYE}\r\n".encode())
            self.transport.close()

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        read_line = reader.readuntil
        lines = itertools.count(1)

        async def fair_readuntil(separator: bytes = b"\n") -> bytes:
            # a client streaming short lines never leaves the buffer empty, and a read from a
            # full buffer never yields: without this, one message of 1 MiB of empty lines
            # held every other client for 1.6 s
            if next(lines) % FAIR_LINES == 0:
                await asyncio.sleep(0)
            return await read_line(separator)

        reader.readuntil = fair_readuntil  # type: ignore[method-assign,assignment]

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and status.startswith("552 Error"):
            status = TOO_LARGE
        await super().push(status)


class _Controller(Controller):
    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sessions: set[_Server] = set()

    def factory(self) -> SMTP:
        return _Server(self.handler, self.sessions, **self.SMTP_kwargs)

    async def drain(self, seconds: float) -> None:
        """Take no more connections; let each message being received finish, and send every
        other client a 421 as soon as it is between messages."""
        if self.server is not None:
            self.server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while self.sessions and loop.time() < deadline:
            for server in list(self.sessions):
                if not server.receiving:
                    server.goodbye()
            await asyncio.sleep(0.05)


class Receiver:
    """A running receiver: its SMTP server thread and its pool of worker threads."""

    def __init__(
        self, controller: _Controller, pool: ThreadPoolExecutor, dns_pool: ThreadPoolExecutor
    ) -> None:
        self.controller = controller
        self.pool = pool
        self.dns_pool = dns_pool

    def stop(self, drain: float = DRAIN_SECONDS) -> None:
        """Stop taking connections, let the messages being received finish within ``drain``
        seconds (each answered before we go), tell the other clients 421, then stop."""
        draining = asyncio.run_coroutine_threadsafe(self.controller.drain(drain), self.controller.loop)
        try:
            draining.result(drain + 5)
        except Exception as err:  # a drain that fails or overruns still ends in a stop
            log.error("inbound mail: draining the receiver failed (%s)", type(err).__name__)
        self.controller.stop()
        self.pool.shutdown(wait=True, cancel_futures=True)
        # a check still waiting on DNS answers nobody now; its thread ends at its next question
        self.dns_pool.shutdown(wait=False, cancel_futures=True)


class HashedPeers(logging.Filter):
    """Write a client's address in aiosmtpd's log lines as a keyed hash, as the web side does."""

    def __init__(self, key: bytes) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._hashed(arg) for arg in record.args)
        record.msg, record.args = logs.scrub(record.getMessage()), None
        return True

    def _hashed(self, arg: object) -> object:
        # a peer is (host, port), or (host, port, flow, scope) for IPv6
        if isinstance(arg, tuple) and arg and isinstance(arg[0], str):
            return f"client {privacy.limit_key(self.key, 'smtp', arg[0])}"
        return arg


def _fingerprint_key(app: Flask) -> bytes:
    try:
        with app.app_context():
            return privacy.fingerprint_key(session())
    except Exception:  # the database is down: a key of this process still hides the address
        return secrets.token_bytes(32)


def start(
    app: Flask,
    host: str,
    port: int,
    resolver: mailauth.Resolver | None = None,
    tls: tuple[str, str] | None = None,
) -> Receiver:
    """Start the receiver in a thread and return it; ``resolver`` answers its DNS questions,
    and with ``tls`` (a certificate file and its key file) it offers STARTTLS."""
    mailbox = app.config.get("UNSUBSCRIBE_MAILTO")
    if not mailbox:
        raise ValueError("PREFS_UNSUBSCRIBE_MAILTO is not set: it is the only mailbox smtpd receives for")
    # aiosmtpd logs each sender, recipient and line of data at INFO and DEBUG, and the
    # client's address in each line at WARNING and above
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.WARNING)
    for old in [f for f in aiosmtpd_log.filters if isinstance(f, HashedPeers)]:
        aiosmtpd_log.removeFilter(old)
    aiosmtpd_log.addFilter(HashedPeers(_fingerprint_key(app)))
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="prefs-smtpd")
    dns_pool = ThreadPoolExecutor(max_workers=DNS_WORKERS, thread_name_prefix="prefs-smtpd-dns")
    handler = UnsubscribeHandler(app, mailbox, resolver or mailauth.SystemResolver(), pool, dns_pool)
    # the greeting names the mailbox's domain, not this host's own name, and no software:
    # aiosmtpd would otherwise say the host's name (socket.getfqdn) and its version
    controller = _Controller(
        handler,
        hostname=host,
        port=port,
        server_hostname=mailbox.rpartition("@")[2],
        ident="ESMTP",
        data_size_limit=MAX_MESSAGE,
        # offered, never required: a sender without TLS must still be able to leave
        tls_context=context,
    )
    controller.start()
    return Receiver(controller, pool, dns_pool)
