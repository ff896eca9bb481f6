"""memory:// counts in process without a thread a write, and forgets what expired; a Redis
that does not answer in time is skipped for a while, and limits hold again when it answers.
"""

import logging
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import redis
from limits import parse
from limits.storage import RedisStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from prefs.extensions import session as db_session
from prefs.web import ratelimit
from prefs.web.ratelimit import SkippedWhenSlow, SweptMemoryStorage
from tests.factories import bearer, make_key, make_subscriber, make_topic, unsubscribe_token
from tests.smtp import free_port

SHARED_REDIS = "redis://127.0.0.1:6379/12"

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def test_memory_means_the_swept_storage_and_redis_the_one_skipped_when_slow():
    assert ratelimit.storage_uri("memory://") == "prefs+memory://"
    assert ratelimit.storage_uri("redis://127.0.0.1:6379/0") == "prefs+redis://127.0.0.1:6379/0"
    assert ratelimit.storage_uri("rediss://h:6380") == "prefs+rediss://h:6380"
    assert isinstance(storage_from_string("prefs+memory://"), SweptMemoryStorage)
    skipping = storage_from_string("prefs+redis://127.0.0.1:6379/0", **ratelimit.storage_options(100))
    assert isinstance(skipping, SkippedWhenSlow) and isinstance(skipping.storage, RedisStorage)


def test_counting_starts_no_thread():
    # limits' own MemoryStorage starts a timer thread on a write whenever the last has fired
    storage = SweptMemoryStorage()
    limiter = FixedWindowRateLimiter(storage)
    rate = parse("1000 per minute")
    storage.timer.join(1)  # the base class's first timer, cancelled at once
    before = set(threading.enumerate())
    for i in range(50):
        assert limiter.hit(rate, "u", f"token{i}")
        time.sleep(0.002)  # longer, all told, than the base class's 10 ms timer
    # threads other tests left may end meanwhile; none may begin
    assert set(threading.enumerate()) - before == set()


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


@contextmanager
def silent_redis():
    """Yield the URL of a server that takes connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes each handshake; nobody ever reads
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()


@contextmanager
def refusing_redis():
    """Yield the URL of a port nobody listens on."""
    yield f"redis://127.0.0.1:{free_port()}/0"


class Delay:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


@contextmanager
def slow_redis(delay: Delay):
    """Yield the URL of a proxy to the shared Redis that holds each reply ``delay`` seconds."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    closing = threading.Event()

    def pipe(source: socket.socket, target: socket.socket, hold: Delay) -> None:
        try:
            while not closing.is_set():
                data = source.recv(65536)
                if not data:
                    break
                time.sleep(hold.seconds)
                target.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            target.close()

    def serve() -> None:
        while not closing.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 6379), timeout=5)
            threading.Thread(target=pipe, args=(client, upstream, Delay(0)), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, delay), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/12"
    finally:
        closing.set()
        listener.close()
        server.join(2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def skipping(url: str, clock: Clock, timeout_ms: int = 100) -> SkippedWhenSlow:
    storage = storage_from_string(ratelimit.PREFIX + url, **ratelimit.storage_options(timeout_ms))
    assert isinstance(storage, SkippedWhenSlow)
    storage.clock = clock
    return storage


def timed_hit(limiter: FixedWindowRateLimiter, key: str) -> tuple[bool, float]:
    started = time.monotonic()
    allowed = limiter.hit(parse("1 per minute"), "test-skipping", key)
    return allowed, time.monotonic() - started


@pytest.mark.parametrize("kind", ["silent", "refusing", "slow at 150 ms"])
def test_a_storage_that_does_not_answer_in_time_is_skipped_for_a_while(kind, caplog):
    caplog.set_level(logging.WARNING, logger="prefs.web.ratelimit")
    clock = Clock()
    if kind == "silent":
        server = silent_redis()
    elif kind == "slow at 150 ms":
        server = slow_redis(Delay(0.15))
    else:
        server = refusing_redis()
    with server as url:
        storage = skipping(url, clock)
        limiter = FixedWindowRateLimiter(storage)
        first = timed_hit(limiter, "a")
        # let through, and the next ones do not ask at all
        later = [timed_hit(limiter, "a") for _ in range(50)]
        assert first[0] and all(allowed for allowed, _ in later)
        assert first[1] < 0.5, first  # one timeout, no retries
        assert max(elapsed for _, elapsed in later) < 0.01
        clock.now += ratelimit.SKIP_SECONDS + 0.1
        assert timed_hit(limiter, "a")[0]  # tried again, and still not answering: skipped again
        assert storage.down
    warnings = [r.getMessage() for r in caplog.records if r.name == "prefs.web.ratelimit"]
    assert len(warnings) == 1 and "did not answer" in warnings[0]


def test_a_storage_that_answers_again_counts_again(caplog):
    caplog.set_level(logging.WARNING, logger="prefs.web.ratelimit")
    store = redis.Redis.from_url(SHARED_REDIS)
    store.flushdb()
    clock = Clock()
    delay = Delay(0.15)
    try:
        with slow_redis(delay) as url:
            storage = skipping(url, clock)
            limiter = FixedWindowRateLimiter(storage)
            assert timed_hit(limiter, "b")[0] and storage.down
            delay.seconds = 0  # fast again
            assert timed_hit(limiter, "b")[0]  # still skipped: too soon to try again
            clock.now += ratelimit.SKIP_SECONDS + 0.1
            assert timed_hit(limiter, "b")[0] and not storage.down  # counted: the first of one
            assert not timed_hit(limiter, "b")[0]  # and the limit holds again
    finally:
        store.flushdb()
        store.close()
    assert [r.getMessage() for r in caplog.records][-1] == "rate limit storage answers again: limits apply"


def test_a_storage_slower_than_usual_but_within_the_timeout_still_counts():
    store = redis.Redis.from_url(SHARED_REDIS)
    store.flushdb()
    try:
        with slow_redis(Delay(0.03)) as url:
            limiter = FixedWindowRateLimiter(skipping(url, Clock(), timeout_ms=100))
            assert timed_hit(limiter, "c")[0]
            assert not timed_hit(limiter, "c")[0]
    finally:
        store.flushdb()
        store.close()


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
