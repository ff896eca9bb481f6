"""Which ``Authentication-Results`` to believe (RFC 8601), and whether they prove DMARC for the From.

Anyone can write an ``Authentication-Results`` header, with any authserv-id. We believe only
the ones our own boundary MTA added, found by where they stand: an MTA prepends its trace
fields, so ours sit at the top of the header section, above everything that came from
outside. The rule, top down:

- the walk passes trace fields our boundary and its local delivery add (``Received``,
  ``Return-Path``, ``Delivered-To``, ``X-Original-To``, ``Received-SPF``, ``ARC-*``,
  ``DKIM-Filter``, ``DMARC-Filter``) and ``Authentication-Results`` bearing our id;
- it stops at any other field, at results bearing another id (another host's), and at the
  first ``Received`` below results of ours (the hop before our boundary): OpenDKIM and
  OpenDMARC insert their results just below Postfix's own ``Received``, Exim's
  ``add_header = :at_start:`` above it, so both layouts pass;
- results bearing our id anywhere below the walk, or results of ours we cannot read (an
  unknown version, bad syntax), are a forgery our MTA failed to strip: nothing is proven.

Encoded words are never decoded: an encoded ``Authentication-Results`` is unreadable, so
it is never ours. A DMARC pass that may rest on a DKIM signature counts only if no such
signature could be a replay (``replays``): mail signed by the victim's domain for someone
else, resent to our mailbox, passes DMARC at any MTA. Stripping incoming results that claim
our id (RFC 8601 section 5) is still the MTA's job; docs/operations.md says how.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from authres import AuthenticationResultsHeader

from . import replays
from .addresses import normalize_or_none, organizational_domain
from .mailreader import MAX_NESTING, Message, nesting

# what the walk parses, at most: real results of one host take a few hundred bytes each,
# and authres takes about 15 ms a kilobyte on comment-heavy input
MAX_RESULTS_BYTES = 16 * 1024
_TRACE = frozenset(
    {
        "received",
        "return-path",
        "delivered-to",
        "x-original-to",
        "received-spf",
        "arc-seal",
        "arc-message-signature",
        "arc-authentication-results",
        "dkim-filter",
        "dmarc-filter",
    }
)
# the authserv-id a field claims, read without a parser: after leading comments, a token or quoted string
_CLAIMED_ID = re.compile(r'\s*(?:\([^()]*\)\s*)*(?:"([^"]*)"|([^\s;()"]+))')


def boundary_proves(
    message: Message, authserv_id: str | None, from_domain: str, mailbox: str | None = None
) -> bool:
    """Tell whether our boundary MTA's own results say DMARC passed for ``from_domain``, on
    grounds that a replay cannot give."""
    if not authserv_id:
        return False
    results = trusted_results(message.fields, authserv_id)
    if results is None or not dmarc_proves(results, from_domain):
        return False
    return not_a_replay(results, message, from_domain, mailbox)


def not_a_replay(results: list[Any], message: Message, from_domain: str, mailbox: str | None) -> bool:
    """Tell whether DMARC's pass rests on what a replay cannot give.

    An aligned SPF pass means the victim's own hosts sent this message to us now. Otherwise
    DMARC passed on an aligned DKIM signature in the message (with none, it passed on SPF):
    every one it may rest on (those whose ``b=`` our results name, else all aligned ones)
    must be one that asks us, not a signature made for mail sent elsewhere.
    """
    wanted = organizational_domain(from_domain)
    for result in _passes(results, "spf"):
        mail_from = _property(result, "smtp", "mailfrom") or ""
        domain = _domain(mail_from.rpartition("@")[2])
        if domain is not None and organizational_domain(domain) == wanted:
            return True
    named = [b for result in _passes(results, "dkim") if (b := _property(result, "header", "b"))]
    resting = []
    for value in message.values("dkim-signature"):
        tags = replays.signature_tags(value)
        if tags is None:
            continue
        domain = _domain(tags.get(b"d", b"").decode("utf-8", "replace"))
        if domain is None or organizational_domain(domain) != wanted:
            continue
        signature = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))
        if named and not any(signature.startswith(b) for b in named):
            continue
        resting.append(tags)
    return all(replays.replay_refusal(tags, message, mailbox) is None for tags in resting)


def _passes(results: Iterable[Any], method: str) -> list[Any]:
    return [
        r
        for r in results
        if str(getattr(r, "method", "")).lower() == method and str(getattr(r, "result", "")).lower() == "pass"
    ]


def _property(result: Any, kind: str, name: str) -> str | None:
    for p in getattr(result, "properties", []):
        if (p.type, p.name) == (kind, name) and p.value is not None:
            return str(p.value)
    return None


def trusted_results(fields: Iterable[tuple[str, str]], authserv_id: str) -> list[Any] | None:
    """Return the results our boundary added, or None when a field claiming our id cannot be believed."""
    ours = authserv_id.strip().lower()
    fields = list(fields)
    results: list[Any] = []
    seen_ours = False
    budget = MAX_RESULTS_BYTES
    stop = len(fields)
    for index, (name, value) in enumerate(fields):
        if name == "authentication-results":
            budget -= len(value)
            if budget < 0:
                return None
            header = _parse(value)
            if header is None or header.authserv_id != ours:
                if _claimed_id(value) == ours:
                    return None
                stop = index
                break
            results.extend(header.results)
            seen_ours = True
        elif (name == "received" and seen_ours) or name not in _TRACE:
            stop = index
            break
    # below the walk nothing is believed; a claim of our id there means the MTA does not strip them
    for name, value in fields[stop:]:
        if name == "authentication-results" and _claimed_id(value) == ours:
            return None
    return results


def dmarc_proves(results: Iterable[Any], from_domain: str) -> bool:
    """Tell whether every DMARC result passes, for exactly the From domain, and there is one."""
    verdicts = [r for r in results if str(getattr(r, "method", "")).lower() == "dmarc"]
    if not verdicts:
        return False
    wanted = _domain(from_domain)
    for verdict in verdicts:
        domains = [
            str(p.value)
            for p in getattr(verdict, "properties", [])
            if (p.type, p.name) == ("header", "from") and p.value is not None
        ]
        if str(verdict.result).lower() != "pass" or len(domains) != 1:
            return False
        if wanted is None or _domain(domains[0]) != wanted:
            return False
    return True


def _parse(value: str) -> Any:
    if "=?" in value or nesting(value) > MAX_NESTING:
        return None
    try:
        return AuthenticationResultsHeader.parse_value(value)
    except Exception:  # authres raises its own SyntaxError, RecursionError and more
        return None


def _claimed_id(value: str) -> str | None:
    match = _CLAIMED_ID.match(value)
    if match is None:
        return None
    return (match.group(1) if match.group(1) is not None else match.group(2)).strip().lower()


def _domain(domain: str) -> str | None:
    """Return a domain's lower-case A-label form, or None where it is not a domain."""
    address = normalize_or_none("postmaster@" + domain.strip().rstrip("."))
    return None if address is None else address.rpartition("@")[2]
