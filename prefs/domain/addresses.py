"""One definition of "the same address": ``normalize``, and how to mask one for display."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache, lru_cache
from typing import Any

from email_validator import EmailNotValidError, validate_email

from ..errors import InvalidAddress

# a plain dot-atom local part of ASCII letters, digits and the usual punctuation:
# a strict subset of what email-validator accepts, with the same 64-octet limit
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9_+\-]+(?:\.[A-Za-z0-9_+\-]+)*\Z")
_MAX_LOCAL = 64
_MAX_ADDRESS = 254


def normalize(address: str) -> str:
    """Return the one stored form of an address, or raise ``InvalidAddress``.

    Trimmed, checked for syntax by email-validator (no DNS), lower-cased, with the
    domain IDNA-encoded.  The common plain-ASCII address takes a fast path whose
    result equals the slow path's; the property tests compare the two.
    """
    if not isinstance(address, str):
        raise InvalidAddress("the address must be text")
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if at and _PLAIN_LOCAL.match(local):
        plain = _plain(local, domain)
        if plain is not None:
            return plain
    return _validated(address)


def _plain(local: str, domain: str) -> str | None:
    """Return the stored form of a plain local part at a domain, or None for the slow path."""
    ascii_domain = _domain(domain)
    if ascii_domain is None or len(local) > _MAX_LOCAL or len(local) + 1 + len(ascii_domain) > _MAX_ADDRESS:
        return None
    return local.lower() + "@" + ascii_domain


def _validated(address: str) -> str:
    if len(address) > 1000:
        raise InvalidAddress("the address is too long")
    try:
        result = validate_email(address, check_deliverability=False)
    except EmailNotValidError as err:
        raise InvalidAddress(str(err)) from None
    return result.local_part.lower() + "@" + result.ascii_domain


@lru_cache(maxsize=8192)
def _domain(domain: str) -> str | None:
    """Return the checked ASCII form of a domain, or None to leave it to the slow path."""
    if not domain.isascii() or len(domain) > 253:
        return None
    try:
        result = validate_email("a@" + domain, check_deliverability=False)
    except EmailNotValidError:
        return None
    return str(result.ascii_domain)


def normalize_or_none(address: str) -> str | None:
    """Return the normalized address, or None where it is not valid."""
    try:
        return normalize(address)
    except InvalidAddress:
        return None


# the fast path's plain address with nothing to trim: that local part, one @, a domain
_PLAIN_ADDRESS = re.compile(r"(" + _PLAIN_LOCAL.pattern.removesuffix(r"\Z") + r")@([^@\s]+)\Z")


def normalize_all(addresses: Iterable[str]) -> list[str | None]:
    """Return ``normalize_or_none`` of each address, in order, for batches of thousands.

    The same fast path as ``normalize``, in one loop: an address that matches
    ``_PLAIN_ADDRESS`` has no space to trim, its one @ is its last, and its local part is
    a plain one, so it takes ``normalize``'s own last step, ``_plain``. An ASCII address with
    two or more @ is never valid (email-validator is called without quoted local parts,
    domain literals or display names, and ASCII has no combining marks), so it is turned
    down without a call. Everything else goes to ``normalize_or_none`` itself; the
    property tests compare the two.
    """
    match, plain_of, slow = _PLAIN_ADDRESS.match, _plain, normalize_or_none
    normalized: list[str | None] = []
    append = normalized.append
    for address in addresses:
        parts = match(address) if type(address) is str else None
        if parts is not None:
            plain = plain_of(*parts.groups())
            if plain is not None:
                append(plain)
                continue
        elif type(address) is str and address.isascii() and address.count("@") > 1:
            append(None)
            continue
        append(slow(address))
    return normalized


# the domains whose mailboxes ignore the dots in a local part, and the name each goes by
DOTS_IGNORED = {"gmail.com": "gmail.com", "googlemail.com": "gmail.com"}


def mailbox(address: str) -> str:
    """Return the inbox a normalized address reaches, to count the mail sent to one person.

    The ``+tag`` is left out (sub-addressing: Gmail, Outlook, iCloud, Fastmail, Proton and
    many mail servers deliver ``ann+x@`` to ``ann@``), and at Gmail the dots too. Only for
    counting: the address on file is never changed.
    """
    local, _, domain = address.rpartition("@")
    local = local.split("+", 1)[0] or local
    if domain in DOTS_IGNORED:
        local, domain = local.replace(".", "") or local, DOTS_IGNORED[domain]
    return f"{local}@{domain}"


def mask(address: str) -> str:
    """Show enough of an address for its owner to recognise it: ``a***@example.com``."""
    local, _, domain = address.partition("@")
    return (local[:1] or "*") + "***@" + domain


def is_our_mailbox(address: str, mailbox: str) -> bool:
    """Tell whether a recipient is the unsubscribe mailbox or one of its ``+<token>`` forms."""
    local, at, domain = address.strip().rpartition("@")
    our_local, _, our_domain = mailbox.rpartition("@")
    if not at or not (local.lower() == our_local or local.lower().startswith(our_local + "+")):
        return False
    normalized = normalize_or_none(f"{our_local}@{domain}")
    return normalized is not None and normalized.rpartition("@")[2] == our_domain


@cache
def _suffixes() -> Any:
    # imported on first use, by the mail that needs it: not a cost of every web worker
    from publicsuffixlist import PublicSuffixList

    # the list the package ships, read once; a TLD missing from it is a suffix by itself
    return PublicSuffixList(accept_unknown=True)


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """Return the public suffix and one label more (the organizational domain of RFC 7489)."""
    domain = domain.lower().strip(".")
    return str(_suffixes().privatesuffix(domain) or domain)
