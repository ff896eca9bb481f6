"""Production settings for ``gunicorn -c gunicorn.conf.py wsgi:app``.

Every value can be overridden on the command line (``-b``, ``-w``...) or in
``GUNICORN_CMD_ARGS``; the ``PREFS_*`` variables below are the usual knobs.

- Workers: ``prefs.ops.gunicorn_worker.ThreadWorker``, gthread (a few processes with a pool of
  threads each) that stops accepting while all its threads are busy, so the kernel hands
  new connections to a worker with a thread free. Idle keep-alive connections wait in
  the worker's selector, not in a thread; a client that trickles its body in holds one
  thread (and no database connection: the app reads bodies before touching the
  database) until it finishes, never a whole process. So a host serves others while
  fewer than workers x threads slow clients are connected (80 on two CPUs;
  tests/reliability/test_slow_clients.py holds 50 against 4 x 16). The TLS proxy in
  front (nginx, Caddy, a load balancer) buffers request bodies, which is what really
  absorbs slow uploads. Async workers
  (gevent) were not chosen: SQLite's lock wait and psycopg's calls would block the
  whole event loop.
- No preload: each worker imports the app after the fork, so no database connection
  (SQLite or PostgreSQL) is ever shared across processes, and ``kill -HUP`` (a graceful
  reload: new workers start with the new code and settings, old ones finish what they
  are serving within ``graceful_timeout``) picks up a new release.
- Metrics: a fresh ``PROMETHEUS_MULTIPROC_DIR`` per master, cleared at start, and each
  dead worker's live figures are dropped, so ``/metrics`` adds up across workers.
- Logs: one format, the app's JSON lines (``prefs/logs.py``), scrubbed of addresses, tokens
  and keys, from gunicorn as from the app. The app writes one access line per request (its
  route pattern, never its path); gunicorn writes one only for a request the app never saw
  (one it refused itself, such as a malformed request line), with no path or header in it.
- Settings: the master checks them before any worker starts, so a missing or malformed one
  stops the service with one line naming it (not a worker that fails and is restarted).
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing
import os
import re
import tempfile
from typing import Any

from gunicorn.glogging import Logger

# before any worker imports prometheus_client, which reads it at import time
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prefs-metrics-")


def _int_env(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            return int(value)
    return default


bind = [os.environ.get("PREFS_BIND", "127.0.0.1:8000")]
workers = _int_env("PREFS_WORKERS", "WEB_CONCURRENCY", default=multiprocessing.cpu_count() * 2 + 1)
# gthread, but a worker whose threads are all busy leaves new connections to the others
worker_class = "prefs.ops.gunicorn_worker.ThreadWorker"
# each slow client holds one thread while it trickles its request in: workers x threads
# (80 on two CPUs) is how many one host absorbs with no buffering proxy in front
threads = _int_env("PREFS_THREADS", default=16)
# one request may take this long (a 10,000-recipient check is well under it) before the
# worker is restarted; a hung thread cannot hold a worker forever
timeout = _int_env("PREFS_TIMEOUT", default=30)
graceful_timeout = 30
# a keep-alive connection waits this long for its next request (in the selector, no thread)
keepalive = 5
# a client that never finishes its headers is bounded by these limits and the proxy's timeouts
limit_request_line = 8190
limit_request_fields = 100
max_requests = 10000
max_requests_jitter = 1000
preload_app = False
# the proxy in front sets X-Forwarded-*; trust it only from this host unless told otherwise
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
# heartbeat files in memory, not on a disk that may stall
# (gunicorn makes its own files there with mkstemp, so the shared folder is safe)
SHM = "/dev/shm"  # noqa: S108
worker_tmp_dir = SHM if os.path.isdir(SHM) else None
# gunicorn's control socket (gunicornc: scale, reload, stop) listens by default in $HOME or
# $XDG_RUNTIME_DIR; the service is run by signals (HUP, TERM), so no such channel is opened
control_socket_disable = True
accesslog = os.environ.get("PREFS_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("PREFS_LOG_LEVEL", "info").lower()


# gunicorn names the client of a request it refuses ("Invalid request from ip=..."): no raw IP is kept
_CLIENT = re.compile(r"\bip=[0-9A-Fa-f:.]+")


class JsonLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, writing the app's JSON lines, each scrubbed as every other is."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from prefs.ops import logs

        logs.configure(cfg.loglevel)  # in the master too: its own lines, and the settings' warnings
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(logs.JsonFormatter())

    def warning(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().warning(_CLIENT.sub("ip=[client]", str(msg)), *args, **kwargs)

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        """Log a request the app did not log itself: its method, status and time, no path."""
        from prefs.ops import logs, monitoring

        if not self.access_log_enabled or environ.get(monitoring.LOGGED):
            return
        header = next((v for k, v in getattr(req, "headers", ()) if k == "X-REQUEST-ID"), None)
        extra = {
            "request_id": logs.request_id(header),
            "method": getattr(req, "method", None),
            "status": int(str(resp.status).split(" ", 1)[0]),
            "duration_ms": round(request_time.total_seconds() * 1000, 2),
        }
        self.access_log.info("request", extra=extra)


logger_class = JsonLogger


def on_starting(server: Any) -> None:
    """Check the settings before any worker starts; start from an empty metrics folder."""
    from prefs import config
    from prefs.web import ratelimit

    # a bad setting stops the master here with one line (ConfigError), before any worker runs
    settings = config.service_settings()
    note = ratelimit.per_process_note(settings["RATELIMIT_STORAGE_URI"], server.cfg.workers)
    if note:
        server.log.warning(note)
    # figures of an earlier run must not add up
    for path in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(path)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the metrics; add its counts to the retired ones."""
    from prometheus_client import multiprocess

    from prefs.ops import metric_files

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
    try:
        metric_files.retire(os.environ["PROMETHEUS_MULTIPROC_DIR"], worker.pid)
    except OSError as err:  # its files stay, still counted: the master must go on
        server.log.warning(
            "metrics of worker %s not retired: %s", worker.pid, err.strerror or type(err).__name__
        )


_M_MMAP_THRESHOLD = -3  # mallopt(3)


_YOUNG_OBJECTS = 50_000  # the collector's first threshold; Python's default is 700


def post_worker_init(worker: Any) -> None:
    """Keep the loaded app out of the garbage collector's passes, and its passes rare.

    Everything imported so far lives as long as the worker. Frozen, the collector's
    passes no longer walk it: a 10,000-recipient check makes enough short-lived objects
    to start a full pass every other request, which cost it a quarter of its time.

    A request's objects are freed by their reference counts when it ends, not by the
    collector, so its passes during a request only walk what the request still holds.
    At Python's default threshold a large check starts many young and middle passes; a
    check holds fewer than 50,000 tracked objects at once, so at that threshold it starts
    none. Cycles are still collected, 50,000 objects later.
    """
    import ctypes
    import gc

    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_YOUNG_OBJECTS, middle, old)
    # glibc's malloc, left to itself, raises its mmap threshold after each large buffer is
    # freed (a 10,000-recipient answer is megabytes), so later ones come from the heap and
    # stay resident; a fixed threshold hands them back to the system when freed
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
