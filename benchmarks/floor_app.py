"""The one-click floor: a bare Flask app that commits one INSERT per request, nothing else."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any

from flask import Flask

app = Flask(__name__)
URL = os.environ["PREFS_DATABASE_URL"]
_local = threading.local()


def _connection() -> Any:
    conn = getattr(_local, "conn", None)
    if conn is None:
        if URL.startswith("sqlite"):
            conn = sqlite3.connect(URL.removeprefix("sqlite:///"), isolation_level=None, timeout=5)
            # the same durability the service runs with
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        else:
            import psycopg

            conn = psycopg.connect(URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
        _local.conn = conn
    return conn


@app.post("/u/<token>")
def one_click(token: str) -> tuple[str, int]:
    mark = "?" if URL.startswith("sqlite") else "%s"
    _connection().execute(
        f"INSERT INTO bench_floor (token, at) VALUES ({mark}, {mark})", (token, time.time())
    )
    return "", 200


@app.get("/healthz")
def healthz() -> str:
    return "ok"
