"""Metrics files on a full disk: an OSError where a figure is first needed, never a SIGBUS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from prometheus_client import values

from prefs.ops import metrics  # noqa: F401 - installs the file class, as every worker does
from prefs.ops.metric_files import FIRST_SIZE, AllocatedFile, entry_size
from tests.disks import fill, small_disk


def in_a_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python of its own: a SIGBUS kills the process that meets it."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk", size="256k") as folder:
        yield folder


def test_prometheus_client_opens_its_files_as_ours():
    # the multiprocess value class looks the file class up in its module when it opens one
    assert values.MmapedDict is AllocatedFile


def test_a_new_file_on_a_full_disk_is_an_error_and_leaves_nothing_half_made(disk):
    fill(disk)
    child = in_a_child(
        f"""
        from prefs.ops.metric_files import AllocatedFile
        try:
            AllocatedFile({str(disk / "counter_1.db")!r})
        except OSError as err:
            print("refused", err.errno)
        """
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout.split() == ["refused", "28"]
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_a_file_that_must_grow_on_a_full_disk_refuses_the_new_figure_and_keeps_the_old(disk):
    child = in_a_child(
        f"""
        import os
        from prefs.ops.metric_files import AllocatedFile
        from tests.disks import fill
        path = {str(disk / "counter_2.db")!r}
        figures = AllocatedFile(path)
        figures.write_value("first", 1.0, 0.0)
        fill(__import__("pathlib").Path({str(disk)!r}))
        n = 0
        try:
            while True:  # bounded by the file's first size: the next key needs it to grow
                figures.write_value("figure %06d" % n, 2.0, 0.0)
                n += 1
        except OSError as err:
            print("refused", err.errno)
        figures.write_value("first", 3.0, 0.0)
        print("kept", dict((k, v) for k, v, _ in figures.read_all_values())["first"], n)
        """
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    lines = child.stdout.splitlines()
    assert lines[0] == "refused 28"
    label, value, written = lines[1].split()
    assert label == "kept"
    assert value == "3.0" and 0 < int(written) < FIRST_SIZE // entry_size("figure 000000")
    assert (disk / "counter_2.db").stat().st_size == FIRST_SIZE


def test_a_file_left_with_holes_is_filled_in_before_it_is_mapped(tmp_path):
    # a worker whose pid an earlier one had opens that one's file: sparse if made elsewhere
    path = tmp_path / "counter_3.db"
    with path.open("wb") as f:
        f.truncate(FIRST_SIZE)
    assert path.stat().st_blocks == 0
    figures = AllocatedFile(str(path))
    figures.write_value("figure", 1.0, 0.0)
    assert path.stat().st_blocks * 512 >= FIRST_SIZE
    figures.close()


def _write(path, figures):
    made = AllocatedFile(str(path))
    for key, value in figures.items():
        made.write_value(key, value, 0.0)
    made.close()


def _read(path):
    from prometheus_client.mmap_dict import MmapedDict

    return {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))}


def test_an_exited_workers_figures_are_added_to_the_retired_ones_and_its_files_deleted(tmp_path):
    from prefs.ops.metric_files import retire

    _write(tmp_path / "counter_101.db", {"a": 2.0, "b": 1.0})
    _write(tmp_path / "counter_102.db", {"a": 3.0, "c": 5.0})
    _write(tmp_path / "histogram_101.db", {"h": 7.0})
    # a retired file half made by a master that was killed: its figures must not count
    _write(tmp_path / "counter_retired.db.new", {"a": 100.0, "stale": 1.0})
    retire(str(tmp_path), 101)
    retire(str(tmp_path), 102)
    retire(str(tmp_path), 103)  # a worker that never made a file
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_retired.db", "histogram_retired.db"]
    assert _read(tmp_path / "counter_retired.db") == {"a": 5.0, "b": 1.0, "c": 5.0}
    assert _read(tmp_path / "histogram_retired.db") == {"h": 7.0}


def test_a_retired_file_with_no_room_leaves_the_workers_files_counted(disk):
    from prefs.ops.metric_files import retire

    _write(disk / "counter_101.db", {"a": 2.0})
    fill(disk)
    with pytest.raises(OSError):
        retire(str(disk), 101)
    assert _read(disk / "counter_101.db") == {"a": 2.0}
    assert not (disk / "counter_retired.db").exists()
