"""Small filesystems of the tests' own (a tmpfs), to fill to the last byte."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(folder: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on a new folder and yield it; unmount it afterwards.

    Mounting needs root (CI runs as root); without it the test is skipped, saying why.
    """
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (the test needs root): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, timeout=10).returncode != 0:
            # a process of ours still holds a file there: detach it now, freed when it exits
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)


def fill(folder: Path) -> None:
    """Fill the filesystem under ``folder`` to its last byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):  # whole pages first, then whatever is left
            for _ in range(1 << 12):  # bounded: far more blocks than a small disk holds
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
