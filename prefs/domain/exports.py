"""The whole suppression list as CSV or NDJSON: read in one snapshot, counted before it is sent."""

from __future__ import annotations

import json
import re
import tempfile
import threading
import unicodedata
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ..errors import Busy
from ..store import end_read, read_snapshot
from . import feeds

CSV = "text/csv"
NDJSON = "application/x-ndjson"
FORMATS = (CSV, NDJSON)
CSV_HEADER = "email,scope,reason,since\r\n"
# how long an export waits for its turn to read before it answers "busy"
TURN_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class Export:
    """A finished export: its file, rewound, and how many rows and bytes it holds."""

    file: IO[bytes]
    rows: int
    size: int


def export_suppressions(
    session: Session, topic_key: str | None, kind: str, spreadsheet: bool = False
) -> Export:
    """Write the suppression list to an unnamed temporary file from one snapshot, and count it.

    Written whole before anything is sent, so the answer can say how many rows and bytes
    follow, and a failure is an error status, never a short ``200``. The snapshot and the
    database connection are given back before the first byte goes out: a slow client holds
    neither, and on SQLite no reader holds the write-ahead log back for a download's length.
    One batch at a time is in memory; the file takes the rest (in ``TMPDIR``). A
    ``spreadsheet`` CSV guards every cell a spreadsheet would run as a formula: not exact,
    so not the default.
    """
    render = ndjson_lines if kind != CSV else spreadsheet_lines if spreadsheet else csv_lines
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (handed to the WSGI server, which closes it)
    try:
        rows = 0
        if kind == CSV:
            spool.write(CSV_HEADER.encode())
        with _turn(session), read_snapshot(session):
            for batch in feeds.stream_suppressions(session, topic_key):
                spool.write(render(batch).encode())
                rows += len(batch)
        size = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return Export(spool, rows, size)


# A whole export holds one of the worker's pooled connections for as long as it reads: its
# snapshot lives in that connection's transaction. At most half the pool is held so at once;
# other exports wait their turn holding none, and the worker's other requests still find one.
_turns: weakref.WeakKeyDictionary[Engine, threading.BoundedSemaphore] = weakref.WeakKeyDictionary()
_turns_lock = threading.Lock()


@contextmanager
def _turn(session: Session) -> Iterator[None]:
    engine = session.get_bind().engine
    with _turns_lock:
        turns = _turns.get(engine)
        if turns is None:
            size = engine.pool.size() if hasattr(engine.pool, "size") else 2
            turns = _turns[engine] = threading.BoundedSemaphore(max(1, size // 2))
    end_read(session)  # wait without a connection
    if not turns.acquire(timeout=TURN_WAIT):
        raise Busy("too many exports are being read at once; try again in a minute")
    try:
        yield
    finally:
        turns.release()


def ndjson_lines(batch: list[feeds.Suppression]) -> str:
    """Return a batch as JSON lines, one object per suppression."""
    return "".join([json.dumps(feeds.as_item(row), separators=(",", ":")) + "\n" for row in batch])


# what a value needing quotes holds: a comma, quote or line break; or a leading formula sign
_CSV_SPECIAL = re.compile(r'[,"\r\n]')
_FORMULA = frozenset("=+-@")
_LINE_FORMULA = re.compile(r"\n[=+\-@]")


def csv_lines(batch: list[feeds.Suppression]) -> str:
    """Return a batch as CSV lines; an address that needs quotes or a formula guard gets them."""
    plain = "".join(
        [f"{email},{scope},{reason or ''},{since or ''}\r\n" for email, scope, reason, since in batch]
    )
    # nearly every batch needs no quoting at all, and a few scans of its text prove it: each
    # line has its three commas and one line break, no quote, and no line starts a formula
    rows = len(batch)
    if (
        plain.count(",") == 3 * rows
        and plain.count("\n") == rows
        and plain.count("\r") == rows
        and '"' not in plain
        and plain[:1] not in _FORMULA
        and not _LINE_FORMULA.search(plain)
    ):
        return plain
    return "".join(
        [
            f"{csv_value(email)},{scope},{reason or ''},{since or ''}\r\n"
            for email, scope, reason, since in batch
        ]
    )


def csv_value(value: str) -> str:
    """Return a value as one CSV field, quoted where needed and guarded against formulas."""
    # addresses may hold quotes or commas in a quoted local part; spreadsheet formulas too
    if value[:1] in _FORMULA or _CSV_SPECIAL.search(value):
        return '"' + value.replace('"', '""') + '"'
    return value


# what a spreadsheet reads as the start of a formula (OWASP's list)
_SPREADSHEET_FORMULA = frozenset("=+-@\t\r")


def spreadsheet_cell(value: str) -> str:
    """Return a cell a spreadsheet shows as text: a leading formula sign gets a ``'`` before it.

    A sign's full-width and small forms (U+FF1D, U+FE66...) count: east-Asian spreadsheets
    read them as the sign itself.
    """
    first = value[:1]
    if first in _SPREADSHEET_FORMULA or unicodedata.normalize("NFKC", first)[:1] in _SPREADSHEET_FORMULA:
        return "'" + value
    return value


def spreadsheet_lines(batch: list[feeds.Suppression]) -> str:
    """Return a batch as CSV lines in which no cell begins a formula."""
    return "".join(
        [",".join(csv_value(spreadsheet_cell(cell or "")) for cell in row) + "\r\n" for row in batch]
    )
