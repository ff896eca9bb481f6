"""Mail to the unsubscribe address: find the request in it, and honour it only when it is proven."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from ..errors import InvalidMessage, InvalidToken, MessageTooLarge, TryLater, UnknownSubscriber, UnknownTopic
from . import authresults, ledger, mailreader
from .addresses import is_our_mailbox, normalize_or_none
from .changes import Origin
from .mailreader import MAX_MESSAGE, Message
from .tokens import Tokens

__all__ = [
    "MAX_MESSAGE",
    "InvalidMessage",
    "MessageTooLarge",
    "Outcome",
    "Request",
    "TryLater",
    "handle",
    "is_our_mailbox",
]

_SUBJECT_TOKEN = re.compile(r"unsubscribe-([A-Za-z0-9_.~-]{20,256})", re.IGNORECASE)
_LOCAL_TOKEN = re.compile(r"^[^@+]+\+([A-Za-z0-9_.~-]{20,256})@", re.IGNORECASE)
# the envelope recipient as our MTA wrote it first, then what the sender wrote
_RECIPIENT_FIELDS = ("x-original-to", "delivered-to", "to")

# given the message and its From domain, tell whether that domain is proven by DMARC
SenderCheck = Callable[[Message, str], bool]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What was done with a message, and why."""

    action: str  # "unsubscribed", "already_unsubscribed" or "ignored"
    scope: str | None
    reason: str


def parse(raw: bytes) -> Message:
    """Read a raw message within bounds, or raise ``InvalidMessage``."""
    return mailreader.read(raw)


def envelope_token(recipients: list[str]) -> str | None:
    """Return the token a List-Unsubscribe mailto put in an envelope recipient's address."""
    for address in recipients:
        local = _LOCAL_TOKEN.match(address.strip())
        if local:
            return local.group(1)
    return None


def find_token(message: Message, recipients: list[str]) -> str | None:
    """Return the token that a List-Unsubscribe mailto put in the envelope, the subject or the header."""
    token = envelope_token(recipients)
    if token is not None:
        return token
    # a field past its bounds is refused only if no other field holds a token
    refusal: InvalidMessage | None = None
    try:
        match = _SUBJECT_TOKEN.search(mailreader.subject(message))
    except InvalidMessage as err:
        match, refusal = None, err
    if match:
        return match.group(1)
    for name in _RECIPIENT_FIELDS:
        try:
            token = envelope_token(mailreader.addresses(message, name))
        except InvalidMessage as err:
            refusal = refusal or err
            continue
        if token is not None:
            return token
    if refusal is not None:
        raise refusal
    return None


def sole_sender(message: Message) -> str | None:
    """Return the normalized From address when there is exactly one From field with one address."""
    if len(message.values("from")) != 1 or message.from_lines != 1:
        return None
    senders = mailreader.addresses(message, "from")
    return normalize_or_none(senders[0]) if len(senders) == 1 else None


@dataclass(frozen=True, slots=True)
class Request:
    """What a message asks: a token's opt-out, or an opt-out for its sender once proven."""

    token: str | None
    message: Message | None = None
    sender: str | None = None

    @property
    def needs_proof(self) -> bool:
        """Tell whether the sender must be proven before anything is recorded."""
        return self.token is None and self.sender is not None


def read_request(raw: bytes, recipients: list[str] | None = None) -> Request:
    """Read what a message asks, or raise ``InvalidMessage``."""
    # the envelope's token alone decides: no cap on the header may refuse a proven opt-out
    token = envelope_token(recipients or [])
    if token is not None:
        return Request(token)
    message = mailreader.read(raw)
    token = find_token(message, [])
    if token is not None:
        return Request(token, message)
    return Request(None, message, sole_sender(message))


def honour(session: Session, tokens: Tokens, request: Request, proven: bool) -> Outcome:
    """Record the opt-out a request asks for when its token is valid or its sender ``proven``."""
    if request.token is not None:
        return _by_token(session, tokens, request.token)
    if request.sender is None:
        return Outcome("ignored", None, "the message has no single valid From address")
    if not proven:
        return Outcome("ignored", None, "no token, and the sender is not proven by dmarc=pass from our host")
    try:
        subscriber = ledger.ensure_subscriber(session, request.sender)
    except UnknownSubscriber:
        return Outcome("already_unsubscribed", "all", "the address was erased")
    changed = ledger.record_opt_out(session, subscriber.public_id, None, Origin("mailto"))
    return Outcome("unsubscribed" if changed else "already_unsubscribed", "all", "sender proven by DMARC")


def handle(
    session: Session,
    tokens: Tokens,
    raw: bytes,
    recipients: list[str] | None = None,
    authserv_id: str | None = None,
    check_sender: SenderCheck | None = None,
    mailbox: str | None = None,
) -> Outcome:
    """Record the opt-out a message asks for, if it names one or proves its sender.

    Without ``check_sender``, the sender is proven only by the results our boundary MTA
    (``authserv_id``) put at the top of the message, and only if the signature they may rest
    on was addressed to ``mailbox``. ``check_sender`` may raise ``TryLater``.
    """
    request = read_request(raw, recipients)
    proven = False
    if request.needs_proof:
        assert request.message is not None and request.sender is not None
        domain = request.sender.rpartition("@")[2]
        if check_sender is None:
            proven = authresults.boundary_proves(request.message, authserv_id, domain, mailbox)
        else:
            proven = check_sender(request.message, domain)
    return honour(session, tokens, request, proven)


def _by_token(session: Session, tokens: Tokens, token: str) -> Outcome:
    try:
        named = tokens.read_unsubscribe(token)
    except InvalidToken:
        return Outcome("ignored", None, "the token in the message is not valid")
    origin = Origin("mailto", campaign=named.campaign)
    try:
        changed = ledger.record_opt_out(session, named.public_id, named.topic, origin)
    except (UnknownSubscriber, UnknownTopic) as err:
        return Outcome("ignored", None, str(err))
    return Outcome(
        "unsubscribed" if changed else "already_unsubscribed", named.topic or "all", "token in the message"
    )
