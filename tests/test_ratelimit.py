"""memory:// counts in process without a thread a write, and forgets what expired."""

import threading
import time

import pytest
import redis
from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from prefs import ratelimit
from prefs.extensions import session as db_session
from prefs.ratelimit import SweptMemoryStorage
from tests.factories import bearer, make_key, make_subscriber, make_topic, unsubscribe_token

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


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


REDIS_URL = "redis://127.0.0.1:6379/11"  # this module's own database


@pytest.fixture
def redis_db():
    """Return an empty Redis database of this module's, emptied again afterwards."""
    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    yield store
    store.flushdb()
    store.close()


@pytest.mark.parametrize("client_ip", ["198.51.100.77", "2001:db8::77"])
def test_the_counters_in_redis_hold_no_ip_token_or_address(make_app, redis_db, client_ip):
    app = make_app(RATELIMIT_STORAGE_URI=REDIS_URL, TRUSTED_PROXIES=1)
    with app.app_context():
        s = db_session()
        make_topic(s, "news")
        ann = make_subscriber(s, "target@example.com")
        token, public_id = unsubscribe_token(ann, "news", "c1"), ann.public_id
        secret = make_key(s, "admin", name="mailer")
    client = app.test_client()
    forwarded = {"X-Forwarded-For": client_ip}
    assert (
        client.post("/unsubscribe", data={"email": "target+1@example.com"}, headers=forwarded).status_code
        == 200
    )
    for _ in range(2):  # the view, then the layer beneath Flask
        assert client.post(f"/u/{token}", data=ONE_CLICK, headers=forwarded).status_code == 200
    assert client.get("/api/v1/topics", headers={**forwarded, **bearer(secret)}).status_code == 200
    keys = " ".join(k.decode() for k in redis_db.keys("*"))
    for scope in ("request-client", "request-address", "u", "api-key"):
        assert scope in keys, keys  # every limit counted
    for secret_text in (
        client_ip,
        client_ip.replace(":", ""),
        token,
        public_id,
        token.rsplit(".", 1)[1],
        "target",
        "example",
    ):
        assert secret_text not in keys, (secret_text, keys)
