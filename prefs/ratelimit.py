"""Rate limits: the keys they count under, and the counters kept in each process (``memory://``).

Every key is a keyed hash (``privacy.limit_key``): the limiter's storage, Redis included,
never holds a client's address, a link's token or an email address.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import Any

from flask import request
from limits.storage import MemoryStorage

from . import privacy
from .addresses import mailbox
from .extensions import session

SCHEME = "prefs+memory"
SWEEP_SECONDS = 1.0


def client(address: str | None) -> str:
    """Return what counts as one client: its IPv4 address, or its IPv6 address's /64.

    An IPv6 host is handed a /64 (RFC 6177) and may pick any address in it: counted
    address by address, one client would have 2^64 limits.
    """
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or ""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_key() -> str:
    """Return the limit key of this request's client."""
    return privacy.limit_key(privacy.fingerprint_key(session()), "client", client(request.remote_addr))


def address_key(address: str) -> str:
    """Return the limit key of a normalized address: the inbox it reaches, not its spelling."""
    return privacy.limit_key(privacy.fingerprint_key(session()), "address", mailbox(address))


def token_key(key: bytes, token: str) -> str:
    """Return the limit key of a link's token, under the fingerprint key ``key``."""
    return privacy.limit_key(key, "token", token)


class SweptMemoryStorage(MemoryStorage):
    """limits' in-process storage, with its expired counters swept once a second.

    limits' own ``MemoryStorage`` starts a new timer thread whenever the last one has
    fired (10 ms after it started) and walks every counter each time. One-click limits
    count per link, so a worker holds thousands of counters: under a burst of one-click
    POSTs the thread starts and the walks took about a sixth of the worker's time. The
    counters themselves are unchanged (a read already drops an expired one); here the
    writes that would start the timer sweep inline instead, at most once a second, and
    only one thread at a time.
    """

    STORAGE_SCHEME = [SCHEME]  # noqa: RUF012 - the base class declares it so

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.timer.cancel()  # the one the base class starts; none follows it
        self._sweeping = threading.Lock()
        self._next_sweep = time.monotonic() + SWEEP_SECONDS

    # the base class's private hook, which every write calls (tests/test_ratelimit.py holds it to that)
    def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or not self._sweeping.acquire(blocking=False):
            return
        try:
            self._next_sweep = now + SWEEP_SECONDS
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]
        finally:
            self._sweeping.release()


def storage_uri(configured: str) -> str:
    """Return the URI Flask-Limiter gets: ``memory://`` means the swept storage above."""
    scheme, sep, rest = configured.partition("://")
    return f"{SCHEME}{sep}{rest}" if scheme == "memory" else configured


def per_process_note(storage: str, workers: int) -> str | None:
    """Return what to say at start when each worker would count a limit on its own, or None."""
    if workers <= 1 or storage.partition("://")[0] not in ("memory", SCHEME):
        return None
    return (
        f"PREFS_RATELIMIT_STORAGE_URI is memory://: each of the {workers} workers counts on its own, "
        f"so a rate limit lets up to {workers} times its rate through on this host; "
        "set redis://... to hold the limits as configured"
    )
