"""Rate limits: the keys they count under, and their storages: counters in each process
(``memory://``), or a shared Redis that is skipped for a while when it does not answer in time.

Every key is a keyed hash (``privacy.limit_key``): the limiter's storage, Redis included,
never holds a client's address, a link's token or an email address.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import request
from limits.storage import MemoryStorage, Storage, storage_from_string
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..domain import privacy
from ..domain.addresses import mailbox
from ..extensions import session

PREFIX = "prefs+"
SCHEME = PREFIX + "memory"
SHARED = ("redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
SWEEP_SECONDS = 1.0
SKIP_SECONDS = 5.0
T = TypeVar("T")
log = logging.getLogger(__name__)


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
    POSTs the threads and the walks would take a large share of the worker's time. The
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


class SkippedWhenSlow(Storage):
    """A shared storage (Redis) that is skipped for a while when it does not answer in time.

    Each call waits at most the client's socket timeout (``storage_options``). One that
    times out, or fails in any way, lets its request through, as an unreachable storage
    always did, and for ``SKIP_SECONDS`` after it every limit is let through without
    asking: a hung Redis costs one request per process a timeout now and then, not every
    request one (or, with redis-py's own retries, several). Then one request tries again
    while the others still skip it. Going and coming back are each logged once.
    """

    STORAGE_SCHEME = [PREFIX + scheme for scheme in SHARED]  # noqa: RUF012 - as the base class's
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: Any) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        storage = storage_from_string(uri.removeprefix(PREFIX), **options)
        if not isinstance(storage, Storage):
            raise ValueError(f"{uri} names an asynchronous storage")
        self.storage = storage
        self._errors: tuple[type[Exception], ...] = (*_as_tuple(storage.base_exceptions), OSError)
        self._trying = threading.Lock()
        self._skip_until = 0.0
        self.down = False

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return self.storage.base_exceptions

    def _ask(self, question: Callable[[], T], skipped: T) -> T:
        if self.down:
            with self._trying:
                now = self.clock()
                if now < self._skip_until:
                    return skipped
                self._skip_until = now + SKIP_SECONDS  # this request tries; the others still skip
        try:
            answer = question()
        except self._errors as err:
            if not self.down:
                self.down = True
                self._skip_until = self.clock() + SKIP_SECONDS
                log.warning(
                    "rate limit storage did not answer (%s): limits are let through, and it is "
                    "tried again every %.0f s",
                    type(err).__name__,
                    SKIP_SECONDS,
                )
            return skipped
        if self.down:
            self.down = False
            log.warning("rate limit storage answers again: limits apply")
        return answer

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._ask(lambda: self.storage.incr(key, expiry, amount), 0)

    def get(self, key: str) -> int:
        return self._ask(lambda: self.storage.get(key), 0)

    def get_expiry(self, key: str) -> float:
        return self._ask(lambda: self.storage.get_expiry(key), time.time())

    def check(self) -> bool:
        return self._ask(self.storage.check, False)

    def reset(self) -> int | None:
        return self._ask(self.storage.reset, None)

    def clear(self, key: str) -> None:
        self._ask(lambda: self.storage.clear(key), None)


def _as_tuple(errors: type[Exception] | tuple[type[Exception], ...]) -> tuple[type[Exception], ...]:
    return errors if isinstance(errors, tuple) else (errors,)


def storage_uri(configured: str) -> str:
    """Return the URI Flask-Limiter gets: the swept storage, or the shared one skipped when slow."""
    scheme, sep, rest = configured.partition("://")
    if scheme == "memory":
        return f"{SCHEME}{sep}{rest}"
    return PREFIX + configured if scheme in SHARED else configured


def storage_options(timeout_ms: int) -> dict[str, Any]:
    """Return the Redis client's options: no wait longer than ``timeout_ms``, no retries."""
    seconds = timeout_ms / 1000
    # redis-py retries a timed-out command (ten times, by default): one wait is enough
    return {"socket_timeout": seconds, "socket_connect_timeout": seconds, "retry": Retry(NoBackoff(), 0)}


def per_process_note(storage: str, workers: int) -> str | None:
    """Return what to say at start when each worker would count a limit on its own, or None."""
    if workers <= 1 or storage.partition("://")[0] not in ("memory", SCHEME):
        return None
    return (
        f"PREFS_RATELIMIT_STORAGE_URI is memory://: each of the {workers} workers counts on its own, "
        f"so a rate limit lets up to {workers} times its rate through on this host; "
        "set redis://... to hold the limits as configured"
    )
