"""Real processes for the fault tests: gunicorn with the shipped config, a throwaway PostgreSQL.

Everything listens on 127.0.0.1 only, and every wait is bounded in time.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import insert

from prefs import create_app
from prefs.domain import ledger, privacy, topics
from prefs.extensions import db
from prefs.models import Subscriber
from prefs.store import tallies
from tests.conftest import TEST_KEYS

ROOT = Path(__file__).resolve().parents[2]
ONE_CLICK_BODY = urlencode({"List-Unsubscribe": "One-Click"})
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def free_port() -> int:
    """Return a loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], seconds: float, what: str, step: float = 0.05) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@dataclass
class Seeded:
    """What a seeded database holds: subscribers' public ids and the API key's secret."""

    public_ids: list[str]
    api_key: str


def seed(database_url: str, instance: Path, addresses: Iterable[str], topic_keys: Iterable[str] = ("news",)):
    """Build the schema, topics, subscribers and an all-scope key, in this process."""
    os.environ["PREFS_INSTANCE_PATH"] = str(instance)
    privacy.forget_cached_keys()
    try:
        app = create_app({"TESTING": True, "DATABASE_URL": database_url, "SECRET_KEYS": TEST_KEYS})
        with app.app_context():
            db.create_all()
            session = db.session()
            for key in topic_keys:
                topics.create_topic(session, key, key.title(), f"About {key}", False)
            rows = [
                {"email": a, "public_id": ledger.new_public_id(), "version": 0}
                for a in dict.fromkeys(addresses)
            ]
            if rows:
                # a few statements of many rows, counted a statement at a time (on PostgreSQL a
                # row's trigger costs more than the row)
                tallies.bulk(session)
                for start in range(0, len(rows), 5000):
                    session.execute(insert(Subscriber).values(rows[start : start + 5000]))
                session.commit()
            from prefs.domain import keys

            _, secret = keys.create_key(session, "reliability", list(keys.SCOPES))
            privacy.fingerprint_key(session)  # made now, not raced for by the workers
            seeded = Seeded([r["public_id"] for r in rows], secret)
            db.session.remove()
            db.engine.dispose()
        return app, seeded
    finally:
        del os.environ["PREFS_INSTANCE_PATH"]


class Service:
    """One gunicorn master started with ``gunicorn.conf.py`` on a loopback port."""

    def __init__(self, database_url: str, workdir: Path, **settings: str) -> None:
        self.port = free_port()
        self.base = f"127.0.0.1:{self.port}"
        self.log_path = workdir / f"gunicorn-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env.update(
            PREFS_DATABASE_URL=database_url,
            PREFS_SECRET_KEYS=",".join(TEST_KEYS),
            PREFS_INSTANCE_PATH=str(workdir / "instance"),
            PREFS_BIND=self.base,
            # links start here, and the tests' requests name this host
            PREFS_BASE_URL=f"http://{self.base}",
            PREFS_WORKERS="4",
            PREFS_THREADS="4",
            PREFS_TIMEOUT="30",
            PREFS_ACCESS_LOG="-",
            PREFS_LOG_LEVEL="WARNING",
            PREFS_REQUEST_MIN_SECONDS="0",
        )
        self.env.update(settings)
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[str] = []

    def start(self) -> Service:
        """Start the master and wait until a worker answers ``/healthz``."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError("gunicorn exited:\n" + self.log_path.read_text()[-4000:])
            try:
                return request(self.base, "GET", "/healthz", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(healthy, 30, "gunicorn to answer /healthz", step=0.1)
        wait_until(lambda: len(self.workers()) == int(self.env["PREFS_WORKERS"]), 30, "every worker")
        return self

    def workers(self) -> list[int]:
        """Return the pids of the master's live workers."""
        assert self.process is not None
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in children.split() if alive(int(pid))]

    def kill_worker(self) -> int:
        """Kill -9 one worker; the master starts another."""
        pid = self.workers()[0]
        os.kill(pid, signal.SIGKILL)
        return pid

    def kill_master(self) -> None:
        """Kill -9 the master; its workers notice and exit; wait until they are gone."""
        assert self.process is not None
        orphans = self.workers()
        self.process.kill()
        self.process.wait(10)
        try:
            wait_until(lambda: not any(alive(pid) for pid in orphans), 20, "orphaned workers to exit")
        finally:
            for pid in orphans:  # bounded: a worker still there after 20 s is ours to end
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop the master gracefully, or kill it after a bound."""
        if self.process is None or self.process.poll() is not None:
            return
        workers = self.workers()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        """Return everything the service wrote so far."""
        return self.log_path.read_text(errors="replace")


def alive(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def request(
    base: str,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a fresh connection; return status, headers and body."""
    host, port = base.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@dataclass
class Outcome:
    """What one request got: a status, or the error that stood for one."""

    status: int | None
    started: float
    elapsed: float
    error: str | None = None
    content_type: str = ""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def timed(base: str, method: str, path: str, **kwargs: Any) -> Outcome:
    """Send one request and say how it went, never raising for a network error."""
    started = time.monotonic()
    try:
        status, headers, body = request(base, method, path, **kwargs)
    except (OSError, http.client.HTTPException) as err:
        return Outcome(None, started, time.monotonic() - started, type(err).__name__)
    elapsed = time.monotonic() - started
    return Outcome(status, started, elapsed, None, headers.get("content-type", ""), body, headers)


class Cluster:
    """A throwaway PostgreSQL on a free loopback port, ours to stop and start."""

    def __init__(self, **settings: str) -> None:
        self.settings = settings  # server settings beyond the defaults below
        self.bin = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="prefs-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            # initdb refuses root: run the cluster as the postgres account
            shutil.chown(self.dir, "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        else:
            self.prefix = []
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.prefix, str(self.bin / tool), *args], check=True, capture_output=True, timeout=60
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        """Stop the server at once (fast shutdown: sessions are cut, nothing is lost)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs, and delete its files."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
