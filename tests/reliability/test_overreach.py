"""Links that undo what the person never did, erasures that leave copies, small inputs that 500.

Each attack of issue 18 (parts 6, 8 and 9) replayed against gunicorn with the shipped
config, and its variants: on SQLite, or on PostgreSQL when the suite runs there.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import pytest
from sqlalchemy import create_engine, select, text

from prefs.domain.feeds import encode_cursor
from prefs.domain.tokens import Tokens
from prefs.models import Event, Subscriber
from tests.conftest import TEST_KEYS
from tests.reliability.figures import report
from tests.reliability.harness import FORM, Service, request, seed

pytestmark = pytest.mark.reliability

PEOPLE = ["ann@example.com", "bob@example.com", "cat@example.com", "dan@example.com", "eve@example.com"]
UNDO_FIELD = re.compile(rb'name="undo" value="([^"]+)"')


def api_headers(key: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


def post_form(base: str, path: str, fields: dict[str, str] | list[tuple[str, str]]):
    return request(base, "POST", path, urlencode(fields).encode(), FORM)


def verdicts(base: str, key: str, topic: str = "news") -> dict[str, str | None]:
    body = json.dumps({"topic": topic, "recipients": PEOPLE}).encode()
    status, _, answer = request(base, "POST", "/api/v1/check", body, api_headers(key))
    assert status == 200
    return {r["email"]: r["reason"] for r in json.loads(answer)["results"]}


@pytest.fixture
def served(service_database, tmp_path):
    """Start gunicorn on a seeded database: two topics (news opt-out, events opt-in), five people."""
    _, seeded = seed(service_database, tmp_path / "instance", PEOPLE, ("news", "events"))
    service = Service(service_database, tmp_path).start()
    try:
        yield service, seeded
    finally:
        service.stop()


def test_undo_never_lifts_a_complaint_or_a_bounce_nor_outlives_a_later_change(served):
    service, seeded = served
    base, key = service.base, seeded.api_key
    tokens = Tokens(TEST_KEYS)
    ann, bob, cat, dan, _ = seeded.public_ids
    events = [
        {"type": "complaint", "email": "ann@example.com"},
        {"type": "hard_bounce", "email": "bob@example.com"},
        {"type": "hard_bounce", "email": "cat@example.com"},
        {"type": "complaint", "email": "cat@example.com"},
    ]
    status, _, _ = request(
        base, "POST", "/api/v1/events", json.dumps({"events": events}).encode(), api_headers(key)
    )
    assert status == 200
    tried = errors = 0
    answers: Counter[int] = Counter()

    def attack(path: str, fields) -> int:
        nonlocal tried, errors
        status, _, _ = post_form(base, path, fields)
        tried += 1
        errors += status >= 500
        answers[status] += 1
        return status

    # the attack as filed, and its variants: every scope, a forged or missing reference, no action
    for public_id in (ann, bob, cat):
        for link in (tokens.unsubscribe(public_id), tokens.unsubscribe(public_id, "news", "c1")):
            for fields in (
                {"action": "undo", "scope": "all"},
                {"action": "undo", "scope": "link"},
                {"action": "undo"},
                {"action": "undo", "scope": "all", "undo": "x"},
                {"action": "undo", "undo": tokens.preferences(public_id)},  # a token of another purpose
            ):
                assert 400 <= attack(f"/u/{link}", fields) < 500
    # a click that changes nothing (already out) gets no undo form to replay
    status, _, page = post_form(base, f"/u/{tokens.unsubscribe(ann)}", {"scope": "all"})
    tried += 1
    assert status == 200 and not UNDO_FIELD.search(page)
    # the preference center lifts a complaint, topic by topic, but never a bounce
    for public_id in (ann, bob, cat):
        assert (
            attack(
                f"/p/{tokens.unsubscribe(public_id, 'news', 'c2')}", [("action", "save"), ("topic", "news")]
            )
            == 303
        )
    # the API never lifts a complaint
    back = [{"type": "resubscribe", "email": e} for e in ("ann@example.com", "cat@example.com")]
    status, _, body = request(
        base, "POST", "/api/v1/events", json.dumps({"events": back}).encode(), api_headers(key)
    )
    tried += 1
    results = json.loads(body)["results"]
    assert [r.get("reason") for r in results] == ["complained", "complained"]
    now = verdicts(base, key)
    # ann: news lifted in the preference center, as the rule allows; bob, cat: still out
    assert now["ann@example.com"] is None
    assert now["bob@example.com"] == "bounced" and now["cat@example.com"] == "complained"
    assert verdicts(base, key, "events")["ann@example.com"] == "complained"

    # an undo form from a real click: replayed, used after a later change, used on another's link
    link = tokens.unsubscribe(dan, "news", "c3")
    status, _, page = post_form(base, f"/u/{link}", {"scope": "link"})
    form = {"action": "undo", "undo": UNDO_FIELD.search(page).group(1).decode()}
    assert attack(f"/u/{tokens.unsubscribe(ann, 'news')}", form) == 400  # another subscriber's link
    assert attack(f"/u/{link}", form) == 200  # honoured once
    assert attack(f"/u/{link}", form) == 409  # replayed
    status, _, page = post_form(base, f"/u/{link}", {"scope": "all"})
    form = {"action": "undo", "undo": UNDO_FIELD.search(page).group(1).decode()}
    request(
        base,
        "POST",
        "/api/v1/events",
        json.dumps({"events": [{"type": "complaint", "email": "dan@example.com"}]}).encode(),
        api_headers(key),
    )
    assert attack(f"/u/{link}", form) == 409  # a complaint came after the click
    # GET and HEAD with an undo form change nothing
    for method in ("GET", "HEAD"):
        status, _, _ = request(base, method, f"/u/{link}?{urlencode(form)}")
        tried += 1
        assert status == 200
    after = verdicts(base, key)
    wrong = [e for e in ("bob@example.com", "cat@example.com", "dan@example.com") if after[e] is None]
    lifted = len(wrong)
    report(
        "undo and lifts: complaints and bounces",
        tried,
        tried - errors,
        lifted,
        errors,
        f"undo and lifts: {tried} requests (undo without a click's reference, forged, replayed, stale, "
        f"another's; page and API re-subscriptions), {lifted} complaints or bounces lifted wrongly, "
        f"{errors} 5xx; answers {dict(sorted(answers.items()))}",
    )
    assert lifted == 0 and errors == 0
    assert after["dan@example.com"] == "complained"


CLICKS = 40


def test_an_undo_racing_other_writers_reverts_only_its_own_click(served, service_database):
    service, seeded = served
    base, key = service.base, seeded.api_key
    tokens = Tokens(TEST_KEYS)
    eve = seeded.public_ids[4]
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def click_and_undo(n: int, public_id: str = eve) -> None:
        link = tokens.unsubscribe(public_id, "news", f"u{n:03d}")
        status, _, page = post_form(base, f"/u/{link}", {"scope": "link"})
        found = UNDO_FIELD.search(page)
        with lock:
            outcomes[f"click {status}"] += 1
        if found is None:
            return
        status, _, _ = post_form(base, f"/u/{link}", {"action": "undo", "undo": found.group(1).decode()})
        with lock:
            outcomes[f"undo {status}"] += 1

    def other_writer(n: int) -> None:
        kind = ("unsubscribe", "resubscribe")[(n // 2) % 2]
        body = json.dumps(
            {"events": [{"type": kind, "email": "eve@example.com", "topic": "news", "campaign": f"a{n:03d}"}]}
        )
        status, _, _ = request(base, "POST", "/api/v1/events", body.encode(), api_headers(key))
        with lock:
            outcomes[f"api {status}"] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: click_and_undo(n) if n % 2 else other_writer(n), range(2 * CLICKS)))
    # and uncontended, on another subscriber: each undo is honoured
    dan = seeded.public_ids[3]
    for n in range(2 * CLICKS, 2 * CLICKS + 10):
        click_and_undo(n, dan)
    engine = create_engine(service_database)
    with engine.connect() as conn:
        trail = conn.execute(
            select(Event.subscriber_id, Event.action, Event.source, Event.campaign)
            .join(Subscriber, Subscriber.id == Event.subscriber_id)
            .where(Subscriber.public_id.in_([eve, dan]))
            .order_by(Event.subscriber_id, Event.id)
        ).all()
    engine.dispose()
    # every honoured undo comes right after its own click, with nothing recorded between
    wrong = 0
    for before, event in itertools.pairwise(trail):
        if event.source == "page" and event.action == "resubscribe":
            own = (event.subscriber_id, "unsubscribe", "page", event.campaign)
            wrong += tuple(before) != own
    server_errors = sum(n for k, n in outcomes.items() if k.split()[1].startswith("5"))
    tried = sum(outcomes.values())
    report(
        "undo racing other writers",
        tried,
        tried - server_errors,
        wrong,
        server_errors,
        f"undo racing: {CLICKS} clicks with their undo against {CLICKS} API writes on one subscriber, "
        f"then 10 alone on another; {outcomes['undo 200']} undos honoured, {outcomes['undo 409']} refused "
        f"as stale, {wrong} reverted anything but their own click, {server_errors} 5xx",
    )
    assert wrong == 0 and server_errors == 0
    assert outcomes["undo 200"] >= 10 and outcomes["undo 409"] >= 1
    assert set(outcomes) <= {"click 200", "undo 200", "undo 409", "api 200"}, outcomes


def small_inputs(key: str) -> list[tuple[str, str, bytes | None, dict[str, str]]]:
    """Return the small inputs of issue 18 part 9 and their variants: (method, path, body, headers)."""
    admin = api_headers(key)
    made: list[tuple[str, str, bytes | None, dict[str, str]]] = []
    for position in (2**63, 2**63 + 1, 2**64, 10**30):
        made.append(("GET", f"/api/v1/suppressions?cursor={encode_cursor(position)}", None, admin))
        made.append(("GET", f"/api/v1/suppressions?topic=news&cursor={encode_cursor(position)}", None, admin))
        made.append(("GET", f"/api/v1/changes?after={encode_cursor(position, 1)}", None, admin))
        made.append(("GET", f"/api/v1/changes?after={encode_cursor(1, position)}", None, admin))
    for moment in (
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59.999999-00:01",
    ):
        made.append(
            (
                "POST",
                "/api/v1/requests",
                json.dumps({"type": "access", "email": "a@example.com", "received_at": moment}).encode(),
                admin,
            )
        )
        made.append(
            (
                "POST",
                "/api/v1/events",
                json.dumps(
                    {"events": [{"type": "complaint", "email": "a@example.com", "at": moment}]}
                ).encode(),
                admin,
            )
        )
    for bad in ("\\ud800", "\\udfff", "\\u0000"):
        for path, text_ in (
            ("/api/v1/topics", f'{{"key": "t1", "name": "N{bad}"}}'),
            ("/api/v1/topics", f'{{"key": "t2", "name": "N", "description": "D{bad}"}}'),
            ("/api/v1/requests", f'{{"type": "access", "email": "a@example.com", "note": "n{bad}"}}'),
            ("/api/v1/check", f'{{"topic": "news", "recipients": ["a@example.com"], "campaign": "c{bad}"}}'),
            (
                "/api/v1/events",
                f'{{"events": [{{"type": "unsubscribe", "email": "a@example.com", "campaign": "c{bad}"}}]}}',
            ),
            ("/api/v1/events", f'{{"events": [{{"type": "unsubscribe", "email": "a{bad}@example.com"}}]}}'),
        ):
            made.append(("POST", path, text_.encode(), admin))
        made.append(("PATCH", "/api/v1/topics/news", f'{{"name": "N{bad}"}}'.encode(), admin))
    for campaign in ("c1\n", "c" * 64 + "\n", "c1\r\n"):
        made.append(
            (
                "POST",
                "/api/v1/events",
                json.dumps(
                    {
                        "events": [
                            {"type": "unsubscribe", "email": "a@example.com", "campaign": campaign},
                            {"type": "unsubscribe", "email": "b@example.com", "campaign": "ok"},
                        ]
                    }
                ).encode(),
                admin,
            )
        )
        made.append(
            (
                "POST",
                "/api/v1/check",
                json.dumps({"topic": "news", "recipients": ["a@example.com"], "campaign": campaign}).encode(),
                admin,
            )
        )
    made.append(("GET", "/api/v1/suppressions?topic=news%0A", None, admin))
    return made


def test_small_inputs_get_a_json_4xx_never_a_500(served, service_database):
    service, seeded = served
    tried = acknowledged = server_errors = 0
    for method, path, body, headers in small_inputs(seeded.api_key):
        status, _, answer = request(service.base, method, path, body, headers)
        tried += 1
        server_errors += status >= 500
        if status >= 400:
            acknowledged += status < 500 and json.loads(answer)["error"]["code"] != ""
        else:  # a batch of events answers each in order: the bad one is an item error
            results = json.loads(answer).get("results")
            assert results and results[0]["status"] == "error", (path, body)
            acknowledged += 1
    engine = create_engine(service_database)
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT campaign FROM events WHERE campaign IS NOT NULL")).scalars().all()
    engine.dispose()
    bad_stored = [c for c in stored if c != "ok"]
    report(
        "small inputs (cursors, times, text, keys)",
        tried,
        acknowledged,
        len(bad_stored),
        server_errors,
        f"small inputs: {tried} requests (cursors past 2^63-1, times outside the years 1..9999 in UTC, "
        f"NUL and lone surrogates in text, keys with a line feed), {acknowledged} answered 4xx in JSON "
        f"or per event, {len(bad_stored)} bad keys stored, {server_errors} 5xx",
    )
    assert server_errors == 0 and acknowledged == tried and bad_stored == []
    assert "Traceback" not in service.log()


ERASED = (
    "anna@xn--bcher-kva.example.com",
    "anna@bücher.example.com",
    "Anna@Bücher.Example.com",
    "fred@example.com",
)


def test_an_erasure_leaves_no_copy_in_the_database_files(service_database, tmp_path):
    people = [*PEOPLE, "anna@xn--bcher-kva.example.com", "fred@example.com"]
    _, seeded = seed(service_database, tmp_path / "instance", people, ("news",))
    if service_database.startswith("postgresql"):
        # the planner's statistics sample the addresses too, as autovacuum would in production
        engine = create_engine(service_database, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("ANALYZE subscribers"))
        engine.dispose()
    service = Service(service_database, tmp_path).start()
    tokens = Tokens(TEST_KEYS)
    admin = api_headers(seeded.api_key)
    tried = server_errors = 0
    try:
        for public_id in seeded.public_ids[-2:]:  # churn: each writes rows and log pages
            for fields in ({"scope": "link"}, {"scope": "all"}):
                post_form(service.base, f"/u/{tokens.unsubscribe(public_id, 'news', 'c1')}", fields)
                tried += 1
        note = json.dumps({"type": "erasure", "email": "Fred@Example.com", "note": "Fred@Example.com phoned"})
        status, _, body = request(service.base, "POST", "/api/v1/requests", note.encode(), admin)
        request_id = json.loads(body)["id"]
        access = json.dumps(
            {"type": "access", "email": "Anna@Bücher.Example.com", "note": "Anna@Bücher.Example.com wrote in"}
        )
        request(service.base, "POST", "/api/v1/requests", access.encode(), admin)
        for method, path in (
            ("DELETE", "/api/v1/subscribers/anna@b%C3%BCcher.example.com"),
            ("POST", f"/api/v1/requests/{request_id}/complete"),
        ):
            status, _, _ = request(service.base, method, path, None, admin)
            tried += 1
            server_errors += status >= 500
            assert status in (200, 204), (path, status)
    finally:
        service.stop()
    found = copies_on_disk(service_database, tmp_path)
    report(
        "erasure leaves no copy in the files",
        tried + 2,
        tried + 2 - server_errors,
        sum(found.values()),
        server_errors,
        f"erasure: an API erasure and a completed erasure request, then the database's files read raw: "
        f"{sum(found.values())} copies of the addresses ({', '.join(sorted(found)) or 'in no file'}), "
        f"{server_errors} 5xx",
    )
    assert found == {}


def copies_on_disk(database_url: str, tmp_path: Path) -> dict[str, int]:
    """Return, per file, how many copies of the erased addresses the database's files hold."""
    if database_url.startswith("sqlite"):
        path = Path(database_url.removeprefix("sqlite:///"))
        files = {
            p.name: p.read_bytes()
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
            if p.exists()
        }
    else:
        import subprocess
        import sys

        env = {
            "PREFS_DATABASE_URL": database_url,
            "PREFS_SECRET_KEYS": ",".join(TEST_KEYS),
            "PREFS_INSTANCE_PATH": str(tmp_path / "instance"),
            "PREFS_BASE_URL": "https://prefs.example.com",
            "PATH": "/usr/bin:/bin",
        }
        done = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "prefs", "erasures", "purge", "--full"],
            env=env,
            capture_output=True,
            timeout=120,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("CHECKPOINT"))
            directory = Path(conn.execute(text("SHOW data_directory")).scalar())
            paths = conn.execute(
                text(
                    # every table, index and TOAST of the database, and the planner's statistics
                    "SELECT c.relname, pg_relation_filepath(c.oid) FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE (n.nspname IN ('public', 'pg_toast') AND c.relkind IN ('r', 'i', 't'))"
                    " OR c.relname = 'pg_statistic'"
                )
            ).all()
        engine.dispose()
        files = {}
        for name, relative in paths:
            main = directory / relative
            if main.exists():
                files[name] = b"".join(
                    p.read_bytes() for p in [main, *sorted(main.parent.glob(main.name + ".*"))]
                )
    found = {}
    for name, data in files.items():
        count = sum(
            data.count(form.encode()) + (data.count(form.lower().encode()) if form.lower() != form else 0)
            for form in ERASED
        )
        if count:
            found[name] = count
    return found
