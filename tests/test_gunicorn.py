"""``gunicorn -c gunicorn.conf.py wsgi:app`` serves, adds metrics up across workers, masks tokens."""

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from prometheus_client.parser import text_string_to_metric_families

from prefs import create_app
from prefs.domain import ledger
from prefs.extensions import db
from tests.conftest import TEST_KEYS

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, headers=None, data=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def served(tmp_path):
    url = f"sqlite:///{tmp_path / 'served.sqlite3'}"
    os.environ["PREFS_INSTANCE_PATH"] = str(tmp_path / "instance")
    try:
        app = create_app({"TESTING": True, "DATABASE_URL": url, "SECRET_KEYS": TEST_KEYS})
        with app.app_context():
            db.create_all()
            ann = ledger.ensure_subscriber(db.session(), "ann@example.com")
            tokens = app.extensions["prefs.tokens"]
            minted = (tokens.unsubscribe(ann.public_id, None, "c1"), tokens.preferences(ann.public_id))
            db.engine.dispose()
    finally:
        del os.environ["PREFS_INSTANCE_PATH"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        PREFS_BASE_URL=f"http://127.0.0.1:{port}",
        PREFS_DATABASE_URL=url,
        PREFS_SECRET_KEYS=",".join(TEST_KEYS),
        PREFS_INSTANCE_PATH=str(tmp_path / "instance"),
        PREFS_WORKERS="2",
        PREFS_THREADS="4",
    )
    log = (tmp_path / "gunicorn.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None:
                raise AssertionError((tmp_path / "gunicorn.log").read_text())
            time.sleep(0.2)
        yield base, process, minted, tmp_path / "gunicorn.log"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_gunicorn_serves_masks_tokens_and_sums_metrics(served):
    base, process, (unsubscribe, preferences), log_path = served
    for _ in range(20):
        assert get(base + "/healthz") == (200, '{"status":"ok"}\n')
    get(f"{base}/u/{unsubscribe}", headers={"X-Request-ID": "one-u"})
    one_click = {"X-Request-ID": "rid-oc", "Content-Type": "application/x-www-form-urlencoded"}
    assert get(f"{base}/u/{unsubscribe}", one_click, b"List-Unsubscribe=One-Click")[0] == 200
    get(
        f"{base}/p/{preferences}?lang=de",
        headers={"Referer": f"https://mail.example/u/{unsubscribe}", "X-Request-ID": "one-p"},
    )
    get(
        f"{base}/api/v1/subscribers/ann@example.com",
        headers={"Authorization": "Bearer prefs_secretkey123", "X-Request-ID": "one-api"},
    )
    get(f"{base}/no/such/page", headers={"X-Request-ID": "one-404"})
    status, text = get(base + "/metrics")
    assert status == 200
    healthz = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "prefs_request_duration_seconds_count" and sample.labels["endpoint"] == "/healthz"
    )
    # two workers answered these; the multiprocess registry adds them up
    assert healthz >= 21

    # HUP: a graceful reload, and the service answers throughout
    process.send_signal(signal.SIGHUP)
    for _ in range(10):
        assert get(base + "/healthz")[0] == 200
        time.sleep(0.1)

    time.sleep(0.5)
    log = log_path.read_text()
    assert '"route":"/u/[token]"' in log and '"route":"/p/[token]"' in log
    for secret in (
        unsubscribe,
        preferences,
        unsubscribe.split(".")[0],
        "ann@example.com",
        "prefs_secretkey123",
    ):
        assert secret not in log
    # one access line per request, in the one JSON format: the app's, not gunicorn's as well
    for rid in ("one-u", "rid-oc", "one-p", "one-api", "one-404"):
        assert log.count(rid) == 1, (rid, [line for line in log.splitlines() if rid in line])
    assert [line for line in log.splitlines() if line.strip() and not line.startswith("{")] == []


def test_gunicorn_without_a_base_url_stops_at_start_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "PREFS_BASE_URL")}
    env.update(
        PREFS_DATABASE_URL=f"sqlite:///{tmp_path / 'x.sqlite3'}",
        PREFS_SECRET_KEYS=",".join(TEST_KEYS),
        PREFS_INSTANCE_PATH=str(tmp_path / "instance"),
        PREFS_WORKERS="2",
    )
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "-b",
            f"127.0.0.1:{free_port()}",
            "wsgi:app",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = process.stdout + process.stderr
    assert process.returncode != 0, output
    named = [line for line in output.splitlines() if "PREFS_BASE_URL" in line]
    assert len(named) == 1, output  # said once, by the master, before any worker starts
    assert "Booting worker" not in output


def load_config() -> dict:
    settings: dict = {}
    exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), settings)  # noqa: S102
    return settings


def test_the_config_reads_its_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFS_WORKERS", "3")
    monkeypatch.setenv("PREFS_THREADS", "7")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    settings = load_config()
    assert (settings["workers"], settings["threads"], settings["worker_class"]) == (
        3,
        7,
        "prefs.ops.gunicorn_worker.ThreadWorker",
    )
    assert settings["preload_app"] is False


def test_a_worker_keeps_its_loaded_app_out_of_the_collectors_passes(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    settings = load_config()
    before = gc.get_threshold()
    try:
        settings["post_worker_init"](None)
        # what the worker loaded is frozen; a 10,000-recipient check starts no pass
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (50_000, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_gunicorn_writes_an_access_line_only_for_a_request_the_app_never_saw(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    settings = load_config()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        cfg = Config()
        cfg.set("accesslog", "-")
        logger = settings["JsonLogger"](cfg)
        response = SimpleNamespace(status="400 Bad Request")
        request = SimpleNamespace(
            method="GET", uri="/u/abc.def?e=ann@example.com", headers=[("X-REQUEST-ID", "r1")]
        )
        logger.access(response, request, {"prefs.logged": True}, timedelta(milliseconds=3))
        logger.access(response, request, {"RAW_URI": request.uri}, timedelta(milliseconds=3))
        logger.warning(
            "Invalid request from ip=203.0.113.9: Invalid HTTP request line: 'GET /p/abc.def ann@example.com'"
        )
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in (captured.out + captured.err).splitlines()]
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert access == [
        {
            "time": access[0]["time"],
            "level": "info",
            "logger": "gunicorn.access",
            "message": "request",
            "request_id": "r1",
            "method": "GET",
            "status": 400,
            "duration_ms": 3.0,
        }
    ]
    (error,) = [line for line in lines if line["logger"] == "gunicorn.error"]
    for secret in ("ann@", "abc.def", "203.0.113.9"):
        assert secret not in error["message"], error


def test_the_worker_serves_an_app_without_prefs_settings():
    # the benchmarks' floor is a bare Flask app under the same configuration: no stall bound to arm
    from flask import Flask

    from prefs.ops.gunicorn_worker import ThreadWorker

    worker = ThreadWorker.__new__(ThreadWorker)
    worker.wsgi = Flask("bare")
    worker.app = SimpleNamespace(wsgi=lambda: worker.wsgi)
    ThreadWorker.load_wsgi(worker)
    assert worker.wsgi.name == "bare"
