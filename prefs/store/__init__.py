"""The store: the only place that speaks to the database below the ORM.

- ``gate``: the engines' settings, and SQLite's write gate (one writer at a time);
- ``transactions``: write transactions committed before the answer, read snapshots, and
  what a failed write means (a conflict to retry, a lock not had, a database away);
- ``group_commit``: the single changes of concurrent requests, committed together;
- ``driver``: the driver's own connections and named statements, for the hot paths;
- ``tallies``: the running counts the overview reads, kept by triggers.
"""

from .driver import DriverTransaction, Statement, Writer, driver_rows, driver_rows_meanwhile
from .gate import WRITE, WRITER_LOCK, WriteGate, busy_timeout_ms, configure_engine, gate_of, write_gate
from .group_commit import GroupCommit
from .transactions import (
    bound_lock_waits,
    conflict,
    end_read,
    lock_wait,
    read_snapshot,
    run_committed,
    write_transaction,
)

__all__ = [
    "WRITE",
    "WRITER_LOCK",
    "DriverTransaction",
    "GroupCommit",
    "Statement",
    "WriteGate",
    "Writer",
    "bound_lock_waits",
    "busy_timeout_ms",
    "configure_engine",
    "conflict",
    "driver_rows",
    "driver_rows_meanwhile",
    "end_read",
    "gate_of",
    "lock_wait",
    "read_snapshot",
    "run_committed",
    "write_gate",
    "write_transaction",
]
