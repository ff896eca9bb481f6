"""Whether a genuine DKIM signature asks us anything, or could be a replay of mail sent elsewhere.

A signature proves that its domain sent those header fields and that body once, to someone.
It asks to leave only when it covers a To that names our mailbox, the one To there is, all
of the body, and was made in the last days. The SMTP receiver applies this to the signatures
it verifies itself, the inbound API to the ones its boundary MTA says it verified.
"""

from __future__ import annotations

import re
import time

from ..errors import InvalidMessage
from .addresses import is_our_mailbox
from .mailreader import Message, addresses

# a signature older than this proves nothing: mail is retried for about five days, a replay is older
MAX_SIGNATURE_AGE = 7 * 86400
# seconds a signer's clock may run ahead of ours
CLOCK_SKEW = 300


def signature_tags(value: str) -> dict[bytes, bytes] | None:
    """Return the tags of a DKIM-Signature field's value, or None when it cannot be read."""
    # dkimpy (and the DNS and crypto it brings) is imported by the mail that needs it, not by
    # every web worker
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        return dict(parse_tag_value(value.encode("utf-8", "replace")))
    except (InvalidTagValueList, ValueError):
        return None


def signed_fields(tags: dict[bytes, bytes]) -> list[bytes]:
    """Return the lower-case names a signature's h= lists."""
    return [name.strip().lower() for name in re.split(rb":", tags.get(b"h", b""))]


def replay_refusal(tags: dict[bytes, bytes], message: Message, mailbox: str | None) -> str | None:
    """Return why a signature could be a replay of mail sent elsewhere, or None when it cannot."""
    if b"l" in tags:
        return "it covers part of the body only (l=)"
    signed = signed_fields(tags)
    if b"from" not in signed or b"to" not in signed:
        return "it does not cover From and To"
    if len(message.values("to")) != 1:
        return "the message has more than one To, or none"
    if not mailbox:
        return "no unsubscribe mailbox is set to read its To against"
    try:
        recipients = addresses(message, "to")
    except InvalidMessage:
        return "its To cannot be read"
    if not any(is_our_mailbox(address, mailbox) for address in recipients):
        return "its To does not name our mailbox"
    now = time.time()
    stamp = tags.get(b"t", b"").strip()
    if not stamp.isdigit() or not now - MAX_SIGNATURE_AGE <= int(stamp) <= now + CLOCK_SKEW:
        return "it has no time (t=), or was made more than a week ago"
    expiry = tags.get(b"x")
    if expiry is not None and (not expiry.strip().isdigit() or int(expiry) < now):
        return "it has expired (x=)"
    return None
