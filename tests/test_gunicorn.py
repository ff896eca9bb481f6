"""``gunicorn -c gunicorn.conf.py wsgi:app`` serves, adds metrics up across workers, masks tokens."""

import gc
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

from prefs import create_app, ledger
from prefs.extensions import db
from tests.conftest import TEST_KEYS

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, headers=None):
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
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
    get(f"{base}/u/{unsubscribe}")
    get(f"{base}/p/{preferences}?lang=de", headers={"Referer": f"https://mail.example/u/{unsubscribe}"})
    get(f"{base}/api/v1/subscribers/ann@example.com", headers={"Authorization": "Bearer prefs_secretkey123"})
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
    assert "/u/[token]" in log and "/p/[token]" in log
    for secret in (
        unsubscribe,
        preferences,
        unsubscribe.split(".")[0],
        "ann@example.com",
        "prefs_secretkey123",
    ):
        assert secret not in log
    assert '"route":"/healthz"' in log  # the app's own JSON lines are there too


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
        "prefs.serving.ThreadWorker",
    )
    assert settings["preload_app"] is False
    assert (
        settings["mask"]("GET /u/abc.def?x HTTP/1.1 ann%40example.com") == "GET /u/[token]?x HTTP/1.1 [email]"
    )


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


def test_the_access_log_masks_the_atoms_its_format_writes_and_hands_on_no_other(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    settings = load_config()
    cfg = Config()
    cfg.set("access_log_format", '%(h)s "%(r)s" %(U)s %({Authorization}i)s %({x-request-id}o)s %(s)s')
    logger = settings["MaskingLogger"](cfg)
    response = SimpleNamespace(status="200 OK", headers=[("X-Request-ID", "r1")], sent=12)
    request = SimpleNamespace(headers=[("AUTHORIZATION", "Bearer prefs_secretkey123"), ("COOKIE", "s=1")])
    environ = {
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": "GET",
        "RAW_URI": "/u/abc.def?e=ann@example.com",
        "PATH_INFO": "/u/abc.def",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_COOKIE": "s=1",
    }
    atoms = logger.atoms(response, request, environ, timedelta(milliseconds=3))
    assert atoms == {
        "h": "127.0.0.1",
        "r": "GET /u/[token]?e=[email] HTTP/1.1",
        "U": "/u/[token]",
        "{authorization}i": "[hidden]",
        "{x-request-id}o": "r1",
        "s": "200",
    }
