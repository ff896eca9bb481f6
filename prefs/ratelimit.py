"""The rate-limit counters kept in each process when no Redis is configured (``memory://``)."""

from __future__ import annotations

import threading
import time
from typing import Any

from limits.storage import MemoryStorage

SCHEME = "prefs+memory"
SWEEP_SECONDS = 1.0


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
