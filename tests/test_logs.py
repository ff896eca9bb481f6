"""JSON log lines: one per request and per change, and nothing personal in any of them."""

import json
import logging
import re
import time

import pytest

from prefs.domain import keys, ledger
from prefs.domain.changes import Origin
from prefs.ops import logs
from prefs.web import links
from tests.factories import make_subscriber, make_topic


def formatted(caplog):
    formatter = logs.JsonFormatter()
    return [formatter.format(record) for record in caplog.records]


def test_a_request_logs_one_json_line_with_its_route_pattern(client, caplog):
    caplog.set_level(logging.INFO)
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    lines = [json.loads(line) for line in formatted(caplog) if '"logger":"prefs.access"' in line]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["request_id"] == "abc-123"
    assert entry["method"] == "GET" and entry["route"] == "/healthz" and entry["status"] == 200
    assert isinstance(entry["duration_ms"], float)


def test_an_insane_request_id_is_replaced():
    assert logs.request_id("a" * 65) != "a" * 65
    assert logs.request_id("bad id\n") != "bad id\n"
    assert len(logs.request_id(None)) == 32
    assert logs.request_id("req.42:x") == "req.42:x"


def test_a_change_logs_its_action_topic_and_source_once_committed(session, caplog):
    make_topic(session, "news")
    ann = make_subscriber(session)
    caplog.set_level(logging.INFO)
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="spring"))
    entries = [json.loads(line) for line in formatted(caplog) if '"logger":"prefs.events"' in line]
    assert entries == [
        {
            "time": entries[0]["time"],
            "level": "info",
            "logger": "prefs.events",
            "message": "unsubscribe",
            "action": "unsubscribe",
            "topic": "news",
            "source": "one-click",
            "campaign": "spring",
            "count": 1,
        }
    ]


def test_scrub_masks_addresses_tokens_and_keys():
    text = "ann@example.com GET /u/abc.def.ghi?x=1 /p/tok%2Fen key prefs_abcdefghijklmnop ann%40example.com"
    scrubbed = logs.scrub(text)
    for secret in (
        "ann@example.com",
        "abc.def.ghi",
        "tok%2Fen",
        "prefs_abcdefghijklmnop",
        "ann%40example.com",
    ):
        assert secret not in scrubbed
    assert "/u/[token]" in scrubbed


def test_scrub_masks_the_halves_of_a_cut_address():
    # a long message cut short (SQLAlchemy truncates its parameter lists) can split an
    # address: either half still says whose it is
    scrubbed = logs.scrub("['[email]', 'ann.smith@exa ... (9000 characters truncated) ... @example9.com']")
    assert "ann.smith" not in scrubbed and "example9.com" not in scrubbed


def test_an_exception_is_logged_scrubbed():
    try:
        raise ValueError("bad address ann@example.com")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed for %s", ("bob@example.com",), None
        )
        import sys

        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "ann@example.com" not in line and "bob@example.com" not in line
    assert "ValueError" in json.loads(line)["error"]


def test_failed_statements_do_not_carry_their_parameters(app):
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["hide_parameters"] is True


def test_configure_sends_json_to_stdout_with_one_handler(capsys):
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        logs.configure("INFO")
        logs.configure("INFO")
        added = [h for h in root.handlers if isinstance(h.formatter, logs.JsonFormatter)]
        assert len(added) == 1 and isinstance(added[0].formatter, logs.JsonFormatter)
        logging.getLogger("prefs.test").info("hello ann@example.com")
        out = capsys.readouterr().out.strip().splitlines()[-1]
        assert json.loads(out)["message"] == "hello [email]"
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)


def test_a_full_flow_logs_no_address_token_or_key(app, client, session, runner, caplog):
    caplog.set_level(logging.DEBUG)
    make_topic(session, "news")
    _, secret = keys.create_key(session, "ops", ["admin"])
    result = runner.invoke(args=["link", "ann@example.com", "--topic", "news", "--campaign", "c1"])
    unsubscribe_url, preferences_url = result.output.strip().splitlines()[-2:]
    token = unsubscribe_url.rsplit("/", 1)[1]
    pref_token = preferences_url.rsplit("/", 1)[1]
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="c1"))
    runner.invoke(args=["unsubscribe", "ann@example.com"])
    client.get(f"/u/{token}")
    client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    client.get(f"/p/{pref_token}")
    client.get("/api/v1/subscribers/ann@example.com", headers={"Authorization": f"Bearer {secret}"})
    client.post("/admin/search", data={"email": "ann@example.com"}, auth=("ops", secret))
    client.get("/metrics")
    assert links.unsubscribe_url(token) == unsubscribe_url
    lines = "\n".join(formatted(caplog))
    assert '"logger":"prefs.access"' in lines and '"logger":"prefs.events"' in lines
    for secret_text in ("ann@example.com", "ann%40example.com", token, pref_token, secret, ann.public_id):
        assert secret_text not in lines


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning"])
def test_log_level_setting_is_checked(make_app, level):
    assert make_app(LOG_LEVEL=level).config["LOG_LEVEL"] == level.upper()


def test_a_bad_log_level_names_the_variable(make_app):
    with pytest.raises(SystemExit, match="PREFS_LOG_LEVEL"):
        make_app(LOG_LEVEL="loud")


def adversarial_texts(size=65_536):
    """Return texts of ``size`` characters shaped to make a backtracking mask take quadratic time."""
    run = "a" * size
    return {
        "one @ after a long run": run[: size - 2] + " @",
        "one @ at its end": run[: size - 1] + "@",
        "one @ in the middle of separators": ("a/" * (size // 4)) + "@" + ("/a" * (size // 4)),
        "only @": "@" * size,
        "@ and separators": "a@ " * (size // 3),
        "%40 with no end": "%4" * (size // 2 - 2) + "%40",
        "%25 runs": "%25" * (size // 3) + "40",
        "a token prefix, repeated": "/u/" * (size // 3),
        "encoded token prefixes": "%2Fu%2F" * (size // 7) + "@",
        "key prefixes": "prefs_" * (size // 6),
        "dots and signature-length runs": ("." + "a" * 26) * (size // 27),
        "a request line": "GET /api/v1/subscribers/" + run[: size - 40] + "@x HTTP/1.1",
        "a header of commas": "Referer: " + ", " * (size // 2) + "x@y",
        "slashes with no @": "a/" * (size // 2),
        "a query, then one @": "a=b&" * (size // 4) + "@",
        "apostrophes, then one @": "o'" * (size // 2) + "@",
        "spaces before no @": " " * (size - 4) + " &#6",
        "quotes": '"' * size,
        "quoted runs": ('"' + "a" * 63 + '" ') * (size // 66),
        "entity starts": "&#" * (size // 2),
        "spelt at, unclosed": "(at" * (size // 3),
        "backslashes": "\\" * size,
    }


def scrub_seconds(text: str) -> float:
    """Return the fastest of three scrubs of ``text``: the least disturbed by other work."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        logs.scrub(text)
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize("shape", adversarial_texts())
def test_scrub_takes_linear_time_on_64_kb_of_adversarial_text(shape):
    small, large = adversarial_texts(16_384)[shape], adversarial_texts()[shape]
    assert len(large) >= 60_000
    # four times the text: about four times the time if linear, sixteen if quadratic
    ratio = scrub_seconds(large) / max(scrub_seconds(small), 1e-4)
    assert ratio < 8, f"{shape}: 64 KB took {ratio:.1f} times as long as 16 KB"


@pytest.mark.parametrize(
    "text",
    [
        "DELETE /api/v1/subscribers/nobody%2540example.com",
        "DELETE /api/v1/subscribers/nobody%252540example.com",
        "GET /api/v1/subscribers/nobody\uff20example.com",
        "GET /api/v1/subscribers/nobody\ufe6bexample.com",
        "GET /api/v1/subscribers/nobody%EF%BC%A0example.com",
        "GET /api/v1/subscribers/nobody%ef%bc%a0example.com",
        "GET /api/v1/subscribers/nobody%40example.com",
        "GET /api/v1/subscribers/NOBODY@EXAMPLE.COM",
        "GET /api/v1/subscribers/nobody%2Btag%40example.com",
        "GET /x?e=nobody+tag%40example.com&t=1",
        "GET /api/v1/subscribers/nobody&#64;example.com",
        "GET /api/v1/subscribers/nobody&#x40;example.com",
        "GET /api/v1/subscribers/nobody&commat;example.com",
        "GET /x?e=nobody%26%2364%3Bexample.com",
        "note: nobody\\u0040example.com",
        "note: nobody\\x40example.com",
        "GET /x?e=nobody%u0040example.com",
        "write to nobody(at)example.com",
        "write to nobody [at] example.com",
        "write to nobody @ example.com",
        "write to nobody@\nexample.com",
        'write to "nobody here"@example.com',
        "GET /api/v1/subscribers/nobody/else@example.com",
        "GET /api/v1/subscribers/else/nobody@example.com",
    ],
)
def test_scrub_masks_encoded_and_lookalike_at_signs(text):
    scrubbed = logs.scrub(text)
    assert "nobody" not in scrubbed.lower() and "example.com" not in scrubbed.lower(), scrubbed


@pytest.mark.parametrize(
    "text",
    [
        "POST /u%2F{token}",
        "POST /u%2f{token}",
        "POST %2Fp%2F{token}",
        "Referer: https://mail.example/p/{token}",
        "GET /unsubscribe?next={token}",
        "token={token}; more",
    ],
)
def test_scrub_leaves_no_whole_token_whatever_its_surroundings(app, text):
    from prefs.web import links

    token = links.tokens().unsubscribe("AAAAAAAAAAAAAAAAAAAAAA", "news", "spring-2026")
    scrubbed = logs.scrub(text.format(token=token))
    assert token not in scrubbed and token.rsplit(".", 1)[1] not in scrubbed, scrubbed


def test_result_rows_never_reach_the_log_even_at_debug(app, session, capsys):
    from sqlalchemy import select

    from prefs.extensions import db
    from prefs.models import Subscriber

    ann = make_subscriber(session, "rowdy@example.com")
    root, engine_log = logging.getLogger(), logging.getLogger("sqlalchemy.engine")
    before = (list(root.handlers), root.level, engine_log.level)
    try:
        logs.configure("DEBUG")
        engine_log.setLevel(logging.DEBUG)  # as an operator's logging config might
        with db.engine.connect() as conn:
            conn.execute(select(Subscriber.email, Subscriber.public_id)).all()
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
        engine_log.setLevel(before[2])
    out = capsys.readouterr().out
    assert "SELECT" in out  # the statement is there, at INFO, its parameters hidden
    assert ann.public_id not in out


def test_limits_the_database_cannot_key_are_one_warning_not_a_traceback(tmp_path, monkeypatch, caplog):
    from prefs import create_app
    from tests.conftest import TEST_KEYS

    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path / "instance"))
    # a database that does not answer: the limits' keys (keyed hashes) cannot be made
    nowhere = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    app = create_app(
        {"TESTING": True, "DATABASE_URL": nowhere, "SECRET_KEYS": TEST_KEYS, "REQUEST_MIN_SECONDS": 0}
    )
    logs.configure("INFO")
    try:
        with caplog.at_level(logging.WARNING):
            response = app.test_client().post("/unsubscribe", data={"email": "ann@example.com"})
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h.formatter, logs.JsonFormatter)]:
            root.removeHandler(handler)
    assert response.status_code == 503
    limiter = [r for r in caplog.records if r.name == "flask-limiter"]
    assert limiter, [r.name for r in caplog.records]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in limiter)
    assert "Traceback" not in "\n".join(formatted(caplog))


@pytest.mark.parametrize(
    "address",
    [
        "o'brien.nobody@example.com",
        "mary=nobody@example.com",
        "who?nobody@example.com",
        "tom&nobody@example.com",
    ],
)
@pytest.mark.parametrize(
    "shape", ["{a}", "('{a}',)", "[generated in 0.00s] ({a!r},)", "GET /api/v1/subscribers/{a} HTTP/1.1"]
)
def test_scrub_masks_a_local_part_holding_what_elsewhere_separates(address, shape):
    # ' = ? & are letters of a local part (RFC 5322 atext): no part of one is left
    scrubbed = logs.scrub(shape.format(a=address))
    local = address.split("@")[0]
    assert not [part for part in re.split(r"['=?&.]", local) if part in scrubbed], scrubbed
    assert "example.com" not in scrubbed
