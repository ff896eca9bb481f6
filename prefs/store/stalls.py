"""A PostgreSQL server that stops answering: each round trip to it is cut after a bound.

A server that hangs (its processes stopped, its disk stalled, its host paused) still
completes TCP handshakes and acknowledges what it is sent: the kernel does that. So
neither libpq's ``connect_timeout`` nor TCP's own timeouts end a statement already sent
on a pooled connection, and the server's own ``statement_timeout`` needs the server to
run. Without a bound of the client's own, every request that holds a connection waits
until the server runs again, and a worker whose threads all wait answers nothing at all.

Here every statement, commit and rollback the driver sends is watched once ``arm`` is
called (by the web server's workers: a command such as ``recount`` may rightly run
longer): one not answered within the bound has its socket shut down, the driver raises
a lost connection, the request answers ``503`` and the pool makes a new connection.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from sqlalchemy import Engine, event

log = logging.getLogger(__name__)


class Watch:
    """The statements being sent now, and one thread that cuts those past their bound."""

    def __init__(self) -> None:
        self.seconds = 0.0  # 0: not armed, nothing is watched
        self._lock = threading.Lock()
        self._due: dict[int, tuple[float, int]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> None:
        """Watch every round trip from now on, cutting one not answered within ``seconds``."""
        self.seconds = seconds

    @contextlib.contextmanager
    def watching(self, fd: int | None) -> Iterator[None]:
        """Watch one round trip on the socket ``fd``."""
        if not self.seconds or fd is None:
            yield
            return
        token = next(self._tokens)
        with self._lock:
            self._due[token] = (time.monotonic() + self.seconds, fd)
            if self._thread is None:  # started after gunicorn's fork, in the worker itself
                self._thread = threading.Thread(target=self._run, name="prefs-stalls", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._due.pop(token, None)

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            now = time.monotonic()
            with self._lock:  # held while cutting: a round trip that has ended is never cut
                late = [token for token, (due, _) in self._due.items() if due <= now]
                for token in late:
                    _, fd = self._due.pop(token)
                    cut(fd)
            if late:
                log.warning(
                    "database did not answer within %.1f s: %d connection(s) cut, their requests answer 503",
                    self.seconds,
                    len(late),
                )


def cut(fd: int) -> None:
    """Shut a socket down both ways, so that a thread blocked reading it returns at once."""
    # a duplicate of the descriptor: shutting it down ends the socket itself, closing it does not
    with contextlib.suppress(OSError), socket.socket(fileno=socket.dup(fd)) as duplicate:
        duplicate.shutdown(socket.SHUT_RDWR)


WATCH = Watch()


def _socket(connection: psycopg.Connection[Any]) -> int | None:
    try:
        return connection.fileno()
    except psycopg.Error:  # closed or lost: the driver raises at once, nothing to watch
        return None


class WatchedCursor(psycopg.Cursor[Any]):
    """psycopg's cursor, each statement it sends watched."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        with WATCH.watching(_socket(self.connection)):
            return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> None:
        with WATCH.watching(_socket(self.connection)):
            super().executemany(*args, **kwargs)


class WatchedConnection(psycopg.Connection[Any]):
    """psycopg's connection, each commit and rollback watched, its cursors ``WatchedCursor``."""

    def commit(self) -> None:
        with WATCH.watching(_socket(self)):
            super().commit()

    def rollback(self) -> None:
        with WATCH.watching(_socket(self)):
            super().rollback()


def watch(engine: Engine) -> None:
    """Have a psycopg engine connect with ``WatchedConnection``s; other drivers are left as they are."""
    if engine.dialect.driver != "psycopg":
        return

    @event.listens_for(engine, "do_connect")
    def connect(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        return WatchedConnection.connect(*cargs, cursor_factory=WatchedCursor, **cparams)


def arm(stall_ms: int, busy_timeout_ms: int) -> None:
    """Watch this process's round trips: cut one not answered past the stall bound.

    The bound is at least a second past the busy timeout, the longest a write may rightly
    wait for a lock.
    """
    WATCH.arm(max(stall_ms, busy_timeout_ms + 1000) / 1000)
