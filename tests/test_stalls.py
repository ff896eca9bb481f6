"""A round trip the database never answers is cut after the bound; one that ends is left alone."""

import socket
import threading
import time

import pytest

from prefs.store import stalls


@pytest.fixture
def watch():
    watch = stalls.Watch()
    watch.arm(0.2)
    return watch


def test_a_read_never_answered_is_cut_after_the_bound(watch):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        started = time.monotonic()
        with watch.watching(ours.fileno()):
            got = ours.recv(10)  # the peer is stopped: only the cut ends this
        assert got == b""
        assert time.monotonic() - started < 2


def test_a_round_trip_that_ends_in_time_is_not_cut(watch):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with watch.watching(ours.fileno()):
            theirs.sendall(b"answer")
            assert ours.recv(10) == b"answer"
        time.sleep(0.6)  # past the bound, and the watcher's ticks
        theirs.sendall(b"later")
        assert ours.recv(10) == b"later"


def test_unarmed_nothing_is_watched():
    watch = stalls.Watch()
    ours, theirs = socket.socketpair()
    with ours, theirs, watch.watching(ours.fileno()):
        threading.Timer(0.3, theirs.sendall, (b"slow",)).start()
        assert ours.recv(10) == b"slow"


def test_the_bound_is_past_the_busy_timeout():
    before = stalls.WATCH.seconds
    try:
        stalls.arm(2000, 5000)
        assert stalls.WATCH.seconds == 6.0
        stalls.arm(10000, 5000)
        assert stalls.WATCH.seconds == 10.0
    finally:
        stalls.WATCH.seconds = before
