"""Evaluate SPF, DKIM and DMARC for a message ourselves, for the SMTP receiver that faces the internet.

pyspf evaluates SPF for the peer, HELO and MAIL FROM the session saw; dkimpy verifies up to
three DKIM signatures, and one that verifies counts only if it cannot be a replay
(``replays``); DMARC (RFC 7489) is the policy lookup and identifier alignment on top, here,
with the organizational domain read from the Public Suffix List (publicsuffixlist). Every
DNS question goes to the ``Resolver`` we are given, so tests answer from a dict, offline,
and production asks the host's resolvers with a deadline. Nothing the message says about its own
authentication is read.

authheaders was tried for the DMARC step and not kept: it takes the organizational domain of
a name under a TLD missing from its list to be the TLD itself (a key of ``evil.example``
aligned with ``From: victim.example``), and reads the From domain with a regex that stops at
the first hyphen.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import dkim
import dns.exception
import dns.resolver
import spf

from ..domain import replays
from ..domain.addresses import organizational_domain
from ..domain.mailreader import Message
from ..errors import TryLater

log = logging.getLogger(__name__)

# seconds for one DNS question, for all of SPF's (RFC 7208 section 4.6.4 allows 20), and
# for a whole check (policy, SPF, DKIM keys), whose sender is then asked to try again later
DNS_TIMEOUT = 3.0
SPF_DEADLINE = 10.0
CHECK_DEADLINE = 12.0
MAX_SIGNATURES = 3
# dkimpy's relaxed body canonicalization takes time quadratic in a run of blanks before a
# line's end; a body with a longer run is not verified (its sender can still pass by SPF)
MAX_BLANK_RUN = 256
_BLANKS = re.compile(rb"[ \t]+")


class DNSUnavailable(Exception):
    """No DNS answer can be had now (a timeout, no server answering); asking later may work."""


class Resolver(Protocol):
    """Answer DNS questions: TXT as bytes (a record's strings joined), A and AAAA as text,
    MX as (preference, host), PTR as host; [] for no such name or no such record."""

    def query(self, name: str, qtype: str) -> list[Any]:
        """Return the answers, or raise ``DNSUnavailable``."""
        ...


class SystemResolver:
    """Ask the host's resolvers (dnspython), each question within ``timeout`` seconds."""

    def __init__(self, timeout: float = DNS_TIMEOUT) -> None:
        self._resolver = dns.resolver.Resolver()
        self._resolver.lifetime = timeout

    def query(self, name: str, qtype: str) -> list[Any]:
        """Return the answers, or raise ``DNSUnavailable``."""
        try:
            answer = self._resolver.resolve(name, qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as err:
            raise DNSUnavailable(type(err).__name__) from None
        except dns.exception.DNSException:
            return []  # a name that cannot exist (an empty or overlong label)
        if qtype == "TXT":
            return [b"".join(record.strings) for record in answer]
        if qtype == "MX":
            return [(record.preference, record.exchange.to_text(True)) for record in answer]
        if qtype == "PTR":
            return [record.target.to_text(True) for record in answer]
        return [record.to_text() for record in answer]


class Deadline:
    """A resolver that stops answering at a deadline, so a check past it stops asking."""

    def __init__(self, resolver: Resolver, seconds: float) -> None:
        self.resolver = resolver
        self.until = time.monotonic() + seconds

    def query(self, name: str, qtype: str) -> list[Any]:
        """Return the answers, or raise ``DNSUnavailable`` once the deadline has passed."""
        if time.monotonic() >= self.until:
            raise DNSUnavailable("the check's deadline has passed")
        return self.resolver.query(name, qtype)


@dataclass(frozen=True, slots=True)
class SenderCheck:
    """Tell whether a message's From domain passes DMARC, from what the SMTP session saw."""

    resolver: Resolver
    peer: str
    helo: str
    mail_from: str
    mailbox: str

    def __call__(self, message: Message, from_domain: str) -> bool:
        """Evaluate SPF, DKIM and DMARC; raise ``TryLater`` when DNS could not answer."""
        try:
            policy = self._policy(from_domain) or self._policy(organizational_domain(from_domain))
        except DNSUnavailable:
            raise TryLater("the sender's DMARC policy could not be looked up; try again later") from None
        if policy is None:
            return False  # no DMARC policy: nothing says which mail the domain sends
        spf_result, spf_domain = self._spf()
        if spf_result == "pass" and _aligned(spf_domain, from_domain, policy.get("aspf", "r")):
            return True
        dkim_domains, dkim_unavailable = self._dkim(message)
        if any(_aligned(d, from_domain, policy.get("adkim", "r")) for d in dkim_domains):
            return True
        if spf_result == "temperror" or dkim_unavailable:
            raise TryLater("the sender's SPF or DKIM records could not be looked up; try again later")
        return False

    def _policy(self, domain: str) -> dict[str, str] | None:
        records = [r.decode("utf-8", "replace") for r in self.resolver.query(f"_dmarc.{domain}", "TXT")]
        policies = [r for r in records if re.match(r"v\s*=\s*DMARC1\s*(;|$)", r)]
        if len(policies) != 1:
            return None  # two policies are none (RFC 7489 section 6.6.3)
        tags = dict(tag.partition("=")[::2] for tag in policies[0].split(";") if "=" in tag)
        policy = {k.strip().lower(): v.strip().lower() for k, v in tags.items()}
        return policy if policy.get("p") in ("none", "quarantine", "reject") else None

    def _spf(self) -> tuple[str, str]:
        sender = self.mail_from or f"postmaster@{self.helo}"
        with _answered_by(self.resolver):
            try:
                result, _, _ = spf.query(
                    i=self.peer, s=sender, h=self.helo, timeout=DNS_TIMEOUT, querytime=SPF_DEADLINE
                ).check()
            except Exception as err:  # pyspf raises on input it cannot read (a bad address or name)
                log.info("inbound mail: SPF not evaluated (%s)", type(err).__name__)
                result = "permerror"
        return str(result), sender.rpartition("@")[2].lower().rstrip(".")

    def _dkim(self, message: Message) -> tuple[list[str], bool]:
        """Return the domains of verified signatures that cannot be replays, and whether a key was missed."""
        raw = message.raw
        passed: list[str] = []
        unavailable = False
        if max(map(len, _BLANKS.findall(raw)), default=0) > MAX_BLANK_RUN:
            log.info("inbound mail: DKIM not evaluated (a run of blanks too long)")
            return passed, unavailable
        try:
            verifier = dkim.DKIM(raw, timeout=DNS_TIMEOUT)
            count = sum(1 for name, _ in verifier.headers if name.lower() == b"dkim-signature")
        except Exception as err:  # a message dkimpy cannot parse proves nothing
            log.info("inbound mail: DKIM not evaluated (%s)", type(err).__name__)
            return passed, unavailable
        for index in range(min(count, MAX_SIGNATURES)):
            try:
                if verifier.verify(idx=index, dnsfunc=self._dkim_key):
                    refusal = replays.replay_refusal(verifier.signature_fields, message, self.mailbox)
                    if refusal is None:
                        passed.append(verifier.domain.decode("ascii", "replace").lower().rstrip("."))
                    else:
                        log.info("inbound mail: a verified DKIM signature proves nothing (%s)", refusal)
            except DNSUnavailable:
                unavailable = True
            except Exception as err:  # a malformed signature or key fails that signature only
                log.info("inbound mail: a DKIM signature did not verify (%s)", type(err).__name__)
        return passed, unavailable

    def _dkim_key(self, name: bytes | str, timeout: float = DNS_TIMEOUT) -> bytes | None:
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        records = self.resolver.query(text, "TXT")
        return records[0] if records else None


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    """Tell whether an authenticated domain aligns with the From domain (RFC 7489 section 3.1)."""
    if not domain:
        return False
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


# pyspf asks a module-level function for every DNS answer, with no way to hand it one per
# query: route that function to the resolver of the check running in this thread, and
# never to pyspf's own lookup (it would ask the network directly, without our deadline)
_current: contextvars.ContextVar[Resolver] = contextvars.ContextVar("prefs_mailauth_resolver")


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    resolver = _current.get(None)
    if resolver is None:
        raise spf.TempError("no resolver is set for this check")
    try:
        answers = resolver.query(name, qtype)
    except DNSUnavailable as err:
        raise spf.TempError(f"DNS {err}") from None
    return [((name, qtype), [a] if qtype in ("TXT", "SPF") else a) for a in answers]


spf.DNSLookup = _spf_lookup


@contextmanager
def _answered_by(resolver: Resolver) -> Iterator[None]:
    token = _current.set(resolver)
    try:
        yield
    finally:
        _current.reset(token)
