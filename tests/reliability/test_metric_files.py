"""Workers restarted again and again (``max_requests``): the metrics folder stays as big as it was.

Each worker keeps its figures in files named by its pid. A worker that exits leaves
them behind, and gunicorn replaces each worker after ``max_requests``: a busy service
would start thousands of workers a day, each adding its files to the folder and to
every scrape's reading, until the disk is full. Yet no figure may be lost with them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.reliability.figures import report
from tests.reliability.harness import Service, request, seed, timed

pytestmark = pytest.mark.reliability

REQUESTS = 240
MAX_REQUESTS = 15  # per worker: about 16 generations of 2 workers


def healthz_count(base: str) -> float:
    """Return how many ``GET /healthz`` the metrics say were answered."""
    status, _, body = request(base, "GET", "/metrics")
    assert status == 200, body[:200]
    line = re.search(
        rb'^prefs_request_duration_seconds_count\{endpoint="/healthz",method="GET"\} (\S+)$', body, re.M
    )
    return float(line.group(1)) if line else 0.0


def test_workers_restarted_again_and_again_leave_a_bounded_metrics_folder(service_database, tmp_path: Path):
    seed(service_database, tmp_path / "instance", ["ann@example.com"])
    folder = tmp_path / "metrics"
    folder.mkdir()
    service = Service(
        service_database,
        tmp_path,
        PROMETHEUS_MULTIPROC_DIR=str(folder),
        PREFS_WORKERS="2",
        GUNICORN_CMD_ARGS=f"--max-requests {MAX_REQUESTS} --max-requests-jitter 0",
    ).start()
    pids: set[int] = set()
    try:
        outcomes = []
        for _ in range(REQUESTS):
            outcomes.append(timed(service.base, "GET", "/healthz"))
            pids.update(service.workers())
        files = sorted(p.name for p in folder.glob("*.db"))
        size = sum(p.stat().st_size for p in folder.glob("*.db"))
        counted = healthz_count(service.base)
        log = service.log()
    finally:
        service.stop()
    answered = sum(o.status == 200 for o in outcomes)
    server_errors = sum(1 for o in outcomes if o.status is not None and o.status >= 500)
    report(
        "workers restarted every 15 requests (metrics files)",
        REQUESTS,
        answered,
        0,
        server_errors,
        f"metrics files: {REQUESTS} requests over {len(pids)} workers (max_requests {MAX_REQUESTS}):"
        f" {len(files)} files, {size // 1024} KiB in the metrics folder; /metrics counts {counted:.0f}"
        f" of {answered} answered /healthz",
    )
    assert answered == REQUESTS
    assert len(pids) > 8, "workers were not restarted"
    # the live workers' files and one folder of the dead ones', never a set per dead worker
    assert len(files) <= 3 * 2 + 4, json.dumps(files)
    assert counted >= answered  # no figure lost with its worker's files
    assert "Traceback" not in log
