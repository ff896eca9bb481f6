"""Fixtures of the fault tests, and the figures table printed at the end of the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from tests.conftest import SERVER_URL, drop_postgresql_database, fresh_postgresql_database
from tests.reliability import figures


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print one row per fault or attack: tried, acknowledged, lost, 5xx."""
    if not figures.ROWS:
        return
    database = "PostgreSQL" if SERVER_URL else "SQLite"
    terminalreporter.section(f"reliability figures ({database})")
    for line in figures.LINES:
        terminalreporter.write_line(line)
    terminalreporter.write_line("")
    for line in figures.table(figures.ROWS):
        terminalreporter.write_line(line)


@pytest.fixture
def service_database(tmp_path: Path) -> Iterator[str]:
    """Return an empty database of the suite's kind, for real server processes to share."""
    if not SERVER_URL:
        yield f"sqlite:///{tmp_path / 'service.sqlite3'}"
        return
    url = fresh_postgresql_database(SERVER_URL, "prefs_rel")
    # the shared server is never stopped or crashed here (those tests run clusters of their
    # own, durable): its commits need not wait for the disk
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f'ALTER DATABASE "{make_url(url).database}" SET synchronous_commit = off'))
    engine.dispose()
    try:
        yield url
    finally:
        drop_postgresql_database(url)
