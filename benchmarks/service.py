"""Start the service (or the floor app) under gunicorn with the shipped configuration."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
SECRET = "benchmark-signing-key-0123456789"


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A running gunicorn master on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """Return the worker pids."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def stop(self) -> None:
        """Stop gunicorn gracefully, then for good."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


def start(app: str, database_url: str, log_path: Path, workers: int | None = None) -> Service:
    """Start ``app`` (``wsgi:app`` or the floor) with ``gunicorn.conf.py``; wait until it answers."""
    port = free_port()
    env = {
        **os.environ,
        "PREFS_BIND": f"127.0.0.1:{port}",
        "PREFS_DATABASE_URL": database_url,
        "PREFS_SECRET_KEYS": SECRET,
        "PREFS_BASE_URL": "https://prefs.example.com",
        # the load generators name the host they connect to
        "PREFS_TRUSTED_HOSTS": "127.0.0.1",
        "PREFS_LOG_LEVEL": "warning",
        "PREFS_ACCESS_LOG": str(log_path.with_suffix(".access.log")),
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # each master makes its own
    if workers:
        env["PREFS_WORKERS"] = str(workers)
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), app],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    service = Service(process, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited; see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                # every worker up, not only the first one that answered
                time.sleep(1.0)
                return service
        except OSError:
            pass
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(f"gunicorn did not answer within 60 s; see {log_path}")


def rss_mb(pid: int) -> float:
    """Return a process's resident memory in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
