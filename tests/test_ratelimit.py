"""memory:// counts in process without a thread a write, and forgets what expired."""

import threading
import time

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from prefs import ratelimit
from prefs.ratelimit import SweptMemoryStorage


def test_memory_means_the_swept_storage_and_redis_is_left_alone():
    assert ratelimit.storage_uri("memory://") == "prefs+memory://"
    assert ratelimit.storage_uri("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert isinstance(storage_from_string("prefs+memory://"), SweptMemoryStorage)


def test_counting_starts_no_thread():
    # limits' own MemoryStorage starts a timer thread on a write whenever the last has fired
    storage = SweptMemoryStorage()
    limiter = FixedWindowRateLimiter(storage)
    rate = parse("1000 per minute")
    storage.timer.join(1)  # the base class's first timer, cancelled at once
    before = threading.active_count()
    for i in range(50):
        assert limiter.hit(rate, "u", f"token{i}")
        time.sleep(0.002)  # longer, all told, than the base class's 10 ms timer
    assert threading.active_count() == before


def test_limits_still_hold_and_expired_counters_are_swept(monkeypatch):
    storage = SweptMemoryStorage()
    limiter = FixedWindowRateLimiter(storage)
    rate = parse("2 per second")
    assert limiter.hit(rate, "u", "a") and limiter.hit(rate, "u", "a")
    assert not limiter.hit(rate, "u", "a")
    for i in range(100):
        limiter.hit(rate, "u", f"other{i}")
    assert len(storage.storage) == 101
    time.sleep(1.1)  # every window is over
    monkeypatch.setattr(storage, "_next_sweep", 0.0)
    assert limiter.hit(rate, "u", "a")  # a new window, and the write sweeps the rest
    assert len(storage.storage) == 1
