"""The workers' metrics files, allocated on disk before they are mapped into memory.

Under gunicorn each worker keeps its figures in memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's ``MmapedDict``). Those files are made
sparse: their pages get disk space only when first written, through the mapping. On a
full disk that first write is a SIGBUS, which kills the worker, whatever it was doing
(answering a change it had just committed, say). Here every page is allocated with
``posix_fallocate`` before it is mapped, so a full disk is an ``OSError`` raised where a
figure is first needed, which ``metrics`` drops and counts, and a page once mapped can
always be written.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict

FIRST_SIZE = 1 << 16  # what prometheus_client gives a new file
NEW = ".new"  # a file being made; the collector reads only ``*.db``


def entry_size(key: str) -> int:
    """Return the bytes one figure takes in a file: its length, key padded to 8, value, time."""
    encoded = len(key.encode("utf-8"))
    return 4 + encoded + (8 - (encoded + 4) % 8) + 16


class AllocatedFile(MmapedDict):
    """prometheus_client's metrics file, with every page it maps allocated first."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            allocate(filename)
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        capacity = self._capacity
        while self._used + entry_size(key) > capacity:
            capacity *= 2
        if capacity > self._capacity:
            # the base class grows the file to the same size, and finds it allocated
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]


def allocate(filename: str) -> None:
    """Give a metrics file its disk space, making it whole under another name when new."""
    try:
        fd = os.open(filename, os.O_RDWR)
    except FileNotFoundError:
        fresh = filename + NEW
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.posix_fallocate(fd, 0, FIRST_SIZE)
            os.rename(fresh, filename)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(fresh)
            raise
        finally:
            os.close(fd)
        return
    try:
        # a worker's pid may be an earlier one's: its file may still have holes
        os.posix_fallocate(fd, 0, max(os.fstat(fd).st_size, FIRST_SIZE))
    finally:
        os.close(fd)


def install() -> None:
    """Have prometheus_client open its per-worker files as ``AllocatedFile``s."""
    # the multiprocess value class looks the file class up here each time it opens one
    values.MmapedDict = AllocatedFile  # type: ignore[attr-defined]


# The figures of workers that have exited, added up: a worker's files are named by its pid,
# and gunicorn replaces each worker after ``max_requests``, so the dead ones' files would
# pile up without bound, on the disk and in every scrape's reading.
RETIRED = "retired"
KINDS = ("counter", "histogram")  # the kinds prefs keeps per worker; their figures add up
LOCK = ".lock"


@contextlib.contextmanager
def _locked(folder: str, exclusive: bool) -> Iterator[None]:
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a folder with no room, or read-only: nobody retires files there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def reading(folder: str) -> contextlib.AbstractContextManager[None]:
    """Hold off ``retire`` while a scrape reads the folder: it sees a dead worker's figures once."""
    return _locked(folder, exclusive=False)


def retire(folder: str, pid: int) -> None:
    """Add an exited worker's figures to the retired ones, and delete its files.

    The retired file is made anew beside the old and renamed over it; a file that cannot be
    made (no room) leaves the worker's files where they are, still counted.
    """
    with _locked(folder, exclusive=True):
        for kind in KINDS:
            dead = os.path.join(folder, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            kept = os.path.join(folder, f"{kind}_{RETIRED}.db")
            totals: dict[str, float] = {}
            for path in (kept, dead):
                with contextlib.suppress(FileNotFoundError):
                    for key, value, _, _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]
                        totals[key] = totals.get(key, 0.0) + value
            fresh = kept + NEW
            with contextlib.suppress(FileNotFoundError):  # left by a master killed while making it
                os.remove(fresh)
            made = AllocatedFile(fresh)
            try:
                for key, value in totals.items():
                    made.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
            finally:
                made.close()  # type: ignore[no-untyped-call]
            os.replace(fresh, kept)
            os.remove(dead)
