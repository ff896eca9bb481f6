"""Mail to the unsubscribe address: find the request in it, and honour it only when it is proven."""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses

from sqlalchemy.orm import Session

from . import ledger
from .addresses import normalize_or_none
from .errors import DomainError, InvalidToken, UnknownSubscriber, UnknownTopic
from .ledger import Origin
from .tokens import Tokens

MAX_MESSAGE = 1024 * 1024
_SUBJECT_TOKEN = re.compile(r"unsubscribe-([A-Za-z0-9_.~-]{20,256})", re.IGNORECASE)
_LOCAL_TOKEN = re.compile(r"^[^@+]+\+([A-Za-z0-9_.~-]{20,256})@", re.IGNORECASE)


class InvalidMessage(DomainError):
    """The body is not an RFC 822 message we can read."""

    code = "invalid_message"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What was done with a message, and why."""

    action: str  # "unsubscribed", "already_unsubscribed" or "ignored"
    scope: str | None
    reason: str


def parse(raw: bytes) -> EmailMessage:
    """Parse a raw message, or raise ``InvalidMessage``."""
    if not raw or len(raw) > MAX_MESSAGE:
        raise InvalidMessage("the message is empty or larger than 1 MiB")
    try:
        message = BytesParser(policy=policy.default).parsebytes(raw)
        headers = {k.lower() for k in message}
    except (ValueError, TypeError, IndexError, LookupError) as err:
        raise InvalidMessage(f"the message cannot be parsed: {type(err).__name__}") from None
    if not headers & {"from", "to", "subject"}:
        raise InvalidMessage("the message has no From, To or Subject header")
    if not isinstance(message, EmailMessage):
        raise InvalidMessage("the message cannot be parsed")
    return message


def _header(message: EmailMessage, name: str) -> str:
    try:
        return str(message.get(name, "") or "")
    except (ValueError, TypeError, IndexError, LookupError):
        return ""


def find_token(message: EmailMessage, recipients: list[str]) -> str | None:
    """Return the token that a List-Unsubscribe mailto put in the subject or the address."""
    match = _SUBJECT_TOKEN.search(_header(message, "subject"))
    if match:
        return match.group(1)
    candidates = list(recipients)
    for name in ("to", "delivered-to", "x-original-to"):
        candidates.extend(address for _, address in getaddresses([_header(message, name)]))
    for address in candidates:
        local = _LOCAL_TOKEN.match(address.strip())
        if local:
            return local.group(1)
    return None


def dmarc_passed(message: EmailMessage, authserv_id: str | None, from_domain: str) -> bool:
    """Tell whether our own receiving host reported ``dmarc=pass`` for the From domain."""
    if not authserv_id:
        return False
    for value in message.get_all("authentication-results") or []:
        text = str(value)
        server, _, results = text.partition(";")
        if server.strip().split()[0:1] != [authserv_id]:
            continue  # anyone can write this header; only our host's counts
        for result in results.split(";"):
            result = result.strip().lower()
            if result.startswith("dmarc=pass"):
                domain = re.search(r"header\.from=([^\s;]+)", result)
                if domain is None or domain.group(1).rstrip(".") == from_domain:
                    return True
    return False


def handle(
    session: Session,
    tokens: Tokens,
    raw: bytes,
    recipients: list[str] | None = None,
    authserv_id: str | None = None,
) -> Outcome:
    """Record the opt-out a message asks for, if it names one or proves its sender."""
    message = parse(raw)
    token = find_token(message, recipients or [])
    if token is not None:
        return _by_token(session, tokens, token)
    senders = getaddresses([_header(message, "from")])
    if len(senders) != 1:
        return Outcome("ignored", None, "the message has no single From address")
    address = normalize_or_none(senders[0][1])
    if address is None:
        return Outcome("ignored", None, "the From address is not valid")
    if not dmarc_passed(message, authserv_id, address.rpartition("@")[2]):
        return Outcome("ignored", None, "no token, and the sender is not proven by dmarc=pass from our host")
    try:
        subscriber = ledger.ensure_subscriber(session, address)
    except UnknownSubscriber:
        return Outcome("already_unsubscribed", "all", "the address was erased")
    changed = ledger.record_opt_out(session, subscriber.public_id, None, Origin("mailto"))
    return Outcome("unsubscribed" if changed else "already_unsubscribed", "all", "sender proven by DMARC")


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
