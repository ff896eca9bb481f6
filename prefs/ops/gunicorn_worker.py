"""gunicorn's gthread worker, taking a new connection only while it has a thread free for it."""

from __future__ import annotations

from typing import Any

from gunicorn.workers.gthread import ThreadWorker as _GThread


class ThreadWorker(_GThread):  # type: ignore[misc]
    """A gthread worker that leaves new connections to other workers while its threads are busy.

    Stock gthread accepts up to ``worker_connections`` (1000) and queues them for its threads:
    a worker whose threads all wait on slow clients would still take connections it cannot
    serve, while another worker idles. This one stops listening while every thread is busy,
    so the kernel hands the connection to a worker that can answer it.
    """

    busy = 0

    def load_wsgi(self) -> None:
        super().load_wsgi()
        # a request's statements are bounded in time; a command's (a recount) may run longer
        settings = getattr(self.wsgi, "config", None)
        if settings is not None and "DB_STALL_MS" in settings:  # prefs's app, not another
            from prefs.store import stalls

            stalls.arm(settings["DB_STALL_MS"], settings["DB_BUSY_TIMEOUT_MS"])

    def enqueue_req(self, conn: Any) -> None:
        self.busy += 1
        super().enqueue_req(conn)
        if self.busy >= self.cfg.threads:
            super().set_accept_enabled(False)

    def finish_request(self, conn: Any, fs: Any) -> None:
        self.busy -= 1
        super().finish_request(conn, fs)

    def set_accept_enabled(self, enabled: bool) -> None:
        # the loop asks to accept whenever connections are below worker_connections
        super().set_accept_enabled(enabled and self.busy < self.cfg.threads)
