"""The suppression list and the change feed: keyset pages, streams, and no skipped change."""

import csv
import errno
import io
import json
import random
import re
import threading
from contextlib import ExitStack, contextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from prefs.domain import exports, feeds, ledger
from prefs.domain.addresses import normalize_or_none
from prefs.domain.changes import Origin
from prefs.errors import Busy, InvalidValue
from prefs.models import Subscriber
from prefs.store import read_snapshot
from tests.conftest import SERVER_URL, drop_postgresql_database, fresh_postgresql_database
from tests.factories import bearer, make_key, make_subscriber, make_topic

API = Origin("api")


@pytest.fixture
def reader(session):
    return bearer(make_key(session, "read"))


@pytest.fixture
def reader_app_client(make_app):
    """Return an app that is not kept in context, its test client, and a reader's header."""
    app = make_app()
    with app.app_context():
        from prefs.extensions import session as current

        make_topic(current(), "news")
        headers = bearer(make_key(current(), "read"))
    return app, app.test_client(), headers


def people(session, n, prefix="p"):
    return [make_subscriber(session, f"{prefix}{i:03d}@example.com") for i in range(n)]


def test_suppressions_for_a_topic_include_everyone_out_of_all_marketing(client, session, reader):
    make_topic(session, "news")
    make_topic(session, "promo")
    topic_out, all_out, complained, bounced, back, promo_out, _stranger = people(session, 7)
    ledger.record_opt_out(session, topic_out.public_id, "news", API)
    ledger.record_opt_out(session, all_out.public_id, None, API)
    ledger.record_opt_out(session, complained.public_id, None, API, "complained")
    ledger.record_opt_out(session, bounced.public_id, None, API, "bounced")
    ledger.record_opt_out(session, back.public_id, None, API)
    ledger.record_resubscribe(session, back.public_id, "news", API)
    ledger.record_opt_out(session, promo_out.public_id, "promo", API)
    body = client.get("/api/v1/suppressions?topic=news", headers=reader).json
    got = {(i["email"], i["scope"], i["reason"]) for i in body["items"]}
    assert got == {
        (topic_out.email, "news", "unsubscribed"),
        (all_out.email, "all", "unsubscribed_all"),
        (complained.email, "all", "complained"),
        (bounced.email, "all", "bounced"),
    }
    assert body["next_cursor"] is None
    assert all(i["since"].endswith("Z") for i in body["items"])
    everything = client.get("/api/v1/suppressions", headers=reader).json["items"]
    assert {i["email"] for i in everything} == {all_out.email, complained.email, bounced.email}


def test_suppression_pages_follow_the_cursor_without_gaps(client, session, reader):
    make_topic(session, "news")
    crowd = people(session, 25)
    for person in crowd:
        ledger.record_opt_out(session, person.public_id, "news", API)
    seen, cursor, pages = [], None, 0
    while True:
        url = "/api/v1/suppressions?topic=news&limit=10" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url, headers=reader).json
        seen += [i["email"] for i in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [p.email for p in crowd]
    assert pages == 3


def test_suppressions_stream_as_csv_and_ndjson(client, session, reader, monkeypatch):
    monkeypatch.setattr(feeds, "STREAM_BATCH", 4)  # several batches in one response
    make_topic(session, "news")
    crowd = people(session, 10)
    for person in crowd:
        ledger.record_opt_out(session, person.public_id, None, API)
    response = client.get(
        "/api/v1/suppressions?topic=news", headers={**reader, "Accept": "text/csv"}, buffered=True
    )
    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [r["email"] for r in rows] == [p.email for p in crowd]
    assert {r["reason"] for r in rows} == {"unsubscribed_all"}
    nd = client.get(
        "/api/v1/suppressions", headers={**reader, "Accept": "application/x-ndjson"}, buffered=True
    )
    lines = [json.loads(line) for line in nd.get_data(as_text=True).splitlines()]
    assert [line["email"] for line in lines] == [p.email for p in crowd]


def test_the_csv_export_quotes_what_a_spreadsheet_would_misread(client, session, reader):
    # "=sum..." is a valid address that a spreadsheet would run as a formula
    odd = [make_subscriber(session, a) for a in ("=sum@example.com", "+1@example.com", "plain@example.com")]
    for person in odd:
        ledger.record_opt_out(session, person.public_id, None, API)
    body = client.get(
        "/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True
    ).get_data(as_text=True)
    lines = body.splitlines()
    assert lines[1].startswith('"=sum@example.com",') and lines[2].startswith('"+1@example.com",')
    assert lines[3].startswith("plain@example.com,all,unsubscribed_all,")
    # the time as the JSON gives it: ISO 8601, UTC, to the microsecond, on either database
    since = [row["since"] for row in csv.DictReader(io.StringIO(body))]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", t) for t in since), since
    page = client.get("/api/v1/suppressions", headers=reader).json["items"]
    assert [item["since"] for item in page] == since


def test_the_spreadsheet_form_guards_every_cell_a_spreadsheet_would_run(client, session, reader):
    addresses = (
        "=cmd|calc@attacker.example",
        "+1-2@example.com",
        "-x@example.com",
        'a"b,c@example.com',
        "plain@example.com",
    )
    for person in [make_subscriber(session, a) for a in addresses]:
        ledger.record_opt_out(session, person.public_id, None, API)
    csv_accept = {**reader, "Accept": "text/csv"}
    with client.get("/api/v1/suppressions", headers=csv_accept) as plain:
        exact = plain.get_data(as_text=True)
    # the plain export is for machines: every address comes back exactly as stored
    assert [row["email"] for row in csv.DictReader(io.StringIO(exact))] == [
        ledger.find_subscriber(session, a).email for a in addresses
    ]
    with client.get("/api/v1/suppressions?spreadsheet=1", headers=csv_accept) as safe:
        assert safe.status_code == 200 and safe.mimetype == "text/csv"
        rows = list(csv.DictReader(io.StringIO(safe.get_data(as_text=True))))
    assert [row["email"] for row in rows] == [
        "'=cmd|calc@attacker.example",
        "'+1-2@example.com",
        "'-x@example.com",
        'a"b,c@example.com',
        "plain@example.com",
    ]
    assert [row["reason"] for row in rows] == ["unsubscribed_all"] * 5
    # no cell of the spreadsheet form begins with what a spreadsheet reads as a formula
    cells = [cell for row in rows for cell in row.values()]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert client.get("/api/v1/suppressions?spreadsheet=maybe", headers=csv_accept).status_code == 422


@pytest.mark.parametrize(
    "sign", ["\uff1d", "\ufe66", "\uff0b", "\ufe62", "\uff0d", "\ufe63", "\uff20", "\ufe6b"]
)
def test_a_spreadsheet_cell_guard_covers_the_full_width_and_small_formula_signs(sign):
    # east-Asian spreadsheets read a full-width = as =; each of these is a valid address's first letter
    assert normalize_or_none(sign + "cmd@example.com") is not None
    assert exports.spreadsheet_cell(sign + "cmd@example.com") == "'" + sign + "cmd@example.com"


def test_a_spreadsheet_cell_guard_covers_tab_and_carriage_return():
    given = ("\tx", "\rx", "@x", "x=1", "")
    assert [exports.spreadsheet_cell(v) for v in given] == ["'\tx", "'\rx", "'@x", "x=1", ""]


@pytest.mark.parametrize("position", [2**63, 2**63 + 1, 2**64])
def test_a_cursor_past_the_largest_stored_id_is_422(client, session, reader, position):
    make_topic(session, "news")
    for url in (
        f"/api/v1/suppressions?cursor={feeds.encode_cursor(position)}",
        f"/api/v1/suppressions?topic=news&cursor={feeds.encode_cursor(position)}",
        f"/api/v1/changes?after={feeds.encode_cursor(position, 1)}",
        f"/api/v1/changes?after={feeds.encode_cursor(1, position)}",
    ):
        response = client.get(url, headers=reader)
        assert response.status_code == 422, (url, response.status_code)
        assert response.json["error"]["code"] == "validation_failed"
    largest = feeds.encode_cursor(2**63 - 1)
    assert client.get(f"/api/v1/suppressions?cursor={largest}", headers=reader).status_code == 200
    last = feeds.encode_cursor(2**63 - 1, 2**63 - 1)
    assert client.get(f"/api/v1/changes?after={last}", headers=reader).status_code == 200


def test_a_topic_chosen_after_leaving_all_takes_one_off_the_list_on_any_page(
    client, session, reader, monkeypatch
):
    monkeypatch.setattr(feeds, "STREAM_BATCH", 3)  # the choices fall inside and at the end of pages
    make_topic(session, "news")
    crowd = people(session, 9)
    chose_before = {crowd[1].email, crowd[5].email}
    chose_after = {crowd[3].email, crowd[8].email}
    for person in crowd:
        if person.email in chose_before:
            ledger.record_resubscribe(session, person.public_id, "news", API)
        ledger.record_opt_out(session, person.public_id, None, API)
        if person.email in chose_after:
            ledger.record_resubscribe(session, person.public_id, "news", API)
    expected = [p.email for p in crowd if p.email not in chose_after]
    body = client.get(
        "/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True
    ).get_data(as_text=True)
    assert [row["email"] for row in csv.DictReader(io.StringIO(body))] == expected
    seen, cursor = [], None
    while True:
        url = "/api/v1/suppressions?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=reader).json
        seen += [item["email"] for item in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == expected


_ADDRESS = st.text(alphabet='ab,"=+-@\r\n ', min_size=1, max_size=8)


@given(
    st.lists(
        st.tuples(_ADDRESS, st.sampled_from(["all", "news"]), st.sampled_from(["bounced", None]),
                  st.sampled_from(["2026-12-01T10:00:00.000000Z", None])),
        min_size=1, max_size=6,
    )
)  # fmt: skip
def test_csv_lines_of_a_batch_are_the_row_by_row_quoting(batch):
    # the export proves most batches need no quotes from a few scans of the whole text
    row_by_row = "".join(
        f"{exports.csv_value(email)},{scope},{reason or ''},{since or ''}\r\n"
        for email, scope, reason, since in batch
    )
    assert exports.csv_lines(batch) == row_by_row
    # and a CSV reader gets every address back, whole
    parsed = list(csv.reader(io.StringIO(exports.csv_lines(batch), newline="")))
    assert [row[0] for row in parsed] == [email for email, *_ in batch]


def test_a_time_loaded_by_another_tool_is_still_written_in_utc_with_z(client, session, reader):
    person = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, person.public_id, None, API)
    # a bulk load (the benchmark's, an operator's) may store the offset in the text on SQLite
    session.execute(text("UPDATE subscribers SET left_all_at = '2026-11-02 00:00:00+00:00'"))
    session.commit()
    (item,) = client.get("/api/v1/suppressions", headers=reader).json["items"]
    assert item["since"].startswith("2026-11-02T00:00:00") and item["since"].endswith("Z")
    assert "+" not in item["since"]


def test_an_empty_stream_is_still_a_csv_with_its_header(client, session, reader):
    make_topic(session, "news")
    response = client.get(
        "/api/v1/suppressions?topic=news", headers={**reader, "Accept": "text/csv"}, buffered=True
    )
    assert response.get_data(as_text=True) == "email,scope,reason,since\r\n"


def test_bad_suppression_queries(client, session, reader):
    assert client.get("/api/v1/suppressions?topic=nope", headers=reader).status_code == 422
    stream = client.get(
        "/api/v1/suppressions?topic=nope", headers={**reader, "Accept": "text/csv"}, buffered=True
    )
    assert stream.status_code == 422
    assert client.get("/api/v1/suppressions?cursor=!!!", headers=reader).status_code == 422
    assert client.get("/api/v1/suppressions?limit=10001", headers=reader).status_code == 422
    assert client.get("/api/v1/suppressions?limit=0", headers=reader).status_code == 422


def test_the_change_feed_lists_every_change_in_order(client, session, reader):
    make_topic(session, "news")
    ann, bob = people(session, 2)
    ledger.record_opt_out(session, ann.public_id, "news", API)
    ledger.record_opt_out(session, bob.public_id, None, API, "complained")
    ledger.record_resubscribe(session, ann.public_id, "news", API)
    body = client.get("/api/v1/changes", headers=reader).json
    assert [(i["email"], i["change"], i["scope"], i["reason"]) for i in body["items"]] == [
        (ann.email, "suppressed", "news", "unsubscribed"),
        (bob.email, "suppressed", "all", "complained"),
        (ann.email, "unsuppressed", "news", None),
    ]
    cursor = body["next_cursor"]
    empty = client.get(f"/api/v1/changes?after={cursor}", headers=reader).json
    assert empty == {"items": [], "next_cursor": cursor, "lag_seconds": 0}
    ledger.record_opt_out(session, ann.public_id, None, API)
    later = client.get(f"/api/v1/changes?after={cursor}", headers=reader).json
    assert [(i["email"], i["change"], i["scope"]) for i in later["items"]] == [
        (ann.email, "suppressed", "all")
    ]


def test_change_pages_neither_skip_nor_repeat(client, session, reader):
    make_topic(session, "news")
    for person in people(session, 23):
        ledger.record_opt_out(session, person.public_id, "news", API)
    seen, cursor = [], None
    for _ in range(10):
        url = "/api/v1/changes?limit=5" + (f"&after={cursor}" if cursor else "")
        body = client.get(url, headers=reader).json
        seen += [i["email"] for i in body["items"]]
        assert body["next_cursor"]
        if not body["items"]:
            break
        cursor = body["next_cursor"]
    assert len(seen) == 23 == len(set(seen))


def test_a_bad_cursor_is_422(client, reader):
    assert client.get("/api/v1/changes?after=zzz", headers=reader).status_code == 422
    with pytest.raises(InvalidValue):
        feeds.decode_cursor(feeds.encode_cursor(1), 2)


def test_a_change_that_commits_late_is_not_skipped(app, session, database_url):
    """Two writers and a reader: the writer that began first commits last."""
    if not database_url.startswith("postgresql"):
        assert_sqlite_writers_take_turns(database_url)
        return
    make_topic(session, "news")
    early, late = people(session, 2)
    engine = create_engine(database_url)
    topic_id = session.execute(text("SELECT id FROM topics WHERE key='news'")).scalar()
    insert = text(
        "INSERT INTO events (txid, subscriber_id, topic_id, action, source, created_at)"
        " VALUES (pg_current_xact_id()::text::bigint, :s, :t, 'unsubscribe', 'api', now())"
    )
    slow = engine.connect()
    slow_tx = slow.begin()
    slow.execute(insert, {"s": early.id, "t": topic_id})  # takes a txid, does not commit yet
    with engine.begin() as fast:
        fast.execute(insert, {"s": late.id, "t": topic_id})  # later txid, committed first
    first = feeds.change_page(session, None, 100)
    session.commit()
    # the reader must not move past the open transaction's rows
    assert [i["email"] for i in first.items] == []
    slow_tx.commit()
    slow.close()
    second = feeds.change_page(session, first.next_cursor, 100)
    assert [i["email"] for i in second.items] == [early.email, late.email]
    engine.dispose()


def assert_sqlite_writers_take_turns(database_url):
    """On SQLite a second writer cannot begin until the first ends: ids follow commit order."""
    import sqlite3

    path = database_url.removeprefix("sqlite:///")
    first = sqlite3.connect(path, isolation_level=None)
    second = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    first.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        second.execute("BEGIN IMMEDIATE")
    first.execute("ROLLBACK")
    second.execute("BEGIN IMMEDIATE")
    second.execute("ROLLBACK")
    first.close()
    second.close()


def test_concurrent_writers_and_a_reader_see_every_change_once(make_app, database_url):
    """Writers in threads record opt-outs while a reader pages; the union is complete."""
    app = make_app()
    with app.app_context():
        from prefs.extensions import session as current

        make_topic(current(), "news")
        crowd = [make_subscriber(current(), f"w{i:03d}@example.com").public_id for i in range(60)]
    errors = []

    def write(ids):
        try:
            with app.app_context():
                for public_id in ids:
                    ledger.record_opt_out(current(), public_id, "news", API)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(crowd[i::3],)) for i in range(3)]
    for thread in threads:
        thread.start()
    seen, cursor = [], None
    with app.app_context():
        for _ in range(2000):
            page = feeds.change_page(current(), cursor, 7)
            current().commit()
            seen += [i["email"] for i in page.items]
            cursor = page.next_cursor
            if len(seen) >= 60 and not any(t.is_alive() for t in threads):
                break
        for thread in threads:
            thread.join(10)
        while True:
            page = feeds.change_page(current(), cursor, 50)
            current().commit()
            if not page.items:
                break
            seen += [i["email"] for i in page.items]
            cursor = page.next_cursor
    assert errors == []
    assert sorted(seen) == sorted(f"w{i:03d}@example.com" for i in range(60))


def test_a_bounce_lifted_under_a_complaint_is_no_change_in_the_feed(client, session, reader):
    make_topic(session, "news")
    [ann] = people(session, 1)
    ledger.record_opt_out(session, ann.public_id, None, API, "bounced")
    ledger.record_opt_out(session, ann.public_id, None, API, "complained")
    cursor = client.get("/api/v1/changes", headers=reader).json["next_cursor"]
    recorded = ledger.record_resubscribe(session, ann.public_id, None, API)
    assert (recorded.changed, recorded.kept_out) == (True, "complained")
    later = client.get(f"/api/v1/changes?after={cursor}", headers=reader).json
    # still out of all marketing for the complaint: nothing to tell a mailer
    assert later["items"] == []
    assert [e.action for e, _ in ledger.history(session, ann)][-1] == "bounce-lifted"
    everything = client.get("/api/v1/suppressions", headers=reader).json["items"]
    assert [(i["email"], i["reason"]) for i in everything] == [(ann.email, "complained")]


@pytest.fixture
def foreign_database(database_url):
    """Return another database on the same PostgreSQL server, for a transaction of someone else's."""
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no transaction ids: a reader sees every committed change")
    url = fresh_postgresql_database(SERVER_URL, "prefs_foreign")
    yield url
    drop_postgresql_database(url)


@contextmanager
def held_open(database_url, statement="SELECT pg_current_xact_id()"):
    """Hold a transaction with an assigned id open on ``database_url``, as a forgotten psql would."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as idle:
            idle.execute(text(statement))
            yield idle
            idle.rollback()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "where", ["another database", "this database", "this database, a subscriber's row held for update"]
)
def test_a_transaction_that_cannot_write_events_does_not_hold_the_feed_back(
    session, database_url, foreign_database, where
):
    make_topic(session, "news")
    crowd = people(session, 5)
    make_subscriber(session, "held@example.com")
    cursor = feeds.change_page(session, None, 100).next_cursor
    session.commit()
    held = {
        "another database": (foreign_database, "SELECT pg_current_xact_id()"),
        "this database": (database_url, "SELECT pg_current_xact_id()"),
        # the forgotten psql session most likely in prefs's own database
        "this database, a subscriber's row held for update": (
            database_url,
            "SELECT * FROM subscribers WHERE email = 'held@example.com' FOR UPDATE",
        ),
    }
    with held_open(*held[where]):
        for person in crowd:
            ledger.record_opt_out(session, person.public_id, "news", API)
            page = feeds.change_page(session, cursor, 100)
            session.commit()
            assert [i["email"] for i in page.items] == [person.email]
            assert page.lag_seconds == 0
            cursor = page.next_cursor


def test_a_prefs_write_held_open_mid_write_is_waited_for_and_its_lag_shown(
    make_app, database_url, foreign_database
):
    """A write that has its transaction id but has not yet written its event commits last."""
    app = make_app()
    with app.app_context():
        from prefs.extensions import session as current

        make_topic(current(), "news")
        first, locked, later = (p.public_id for p in people(current(), 3))
        emails = {p.public_id: p.email for p in current().scalars(select(Subscriber))}
        cursor = feeds.change_page(current(), None, 100).next_cursor
        current().commit()
    engine = create_engine(database_url)
    errors: list[BaseException] = []

    def slow_write() -> None:
        try:
            with app.app_context():
                # the first change changes nothing but is given the transaction id; the second
                # waits for the row lock held below, before its event is written
                ledger.record_many(
                    current(),
                    [ledger.Change(first, "news", True, API), ledger.Change(locked, "news", False, API)],
                )
        except BaseException as err:  # surfaced below
            errors.append(err)

    with held_open(foreign_database), engine.connect() as locker, app.app_context():
        locker.execute(text("SELECT id FROM subscribers WHERE public_id = :p FOR UPDATE"), {"p": locked})
        writer = threading.Thread(target=slow_write)
        writer.start()
        try:
            waiting = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                           " AND datname = current_database()")  # fmt: skip
            for _ in range(500):
                if locker.execute(waiting).scalar():
                    break
                threading.Event().wait(0.01)
            else:
                raise AssertionError("the slow write never reached the row lock")
            ledger.record_opt_out(current(), later, "news", API)  # a later transaction id, committed first
            held = feeds.change_page(current(), cursor, 100)
            current().commit()
            assert held.items == [] and held.next_cursor == cursor
            assert held.lag_seconds > 0
        finally:
            locker.rollback()
            writer.join(10)
        assert errors == []
        page = feeds.change_page(current(), cursor, 100)
        current().commit()
        assert [i["email"] for i in page.items] == [emails[locked], emails[later]]
        assert page.lag_seconds == 0
    engine.dispose()


@pytest.mark.parametrize("kind", ["text/csv", "application/x-ndjson"])
def test_an_export_says_how_many_rows_and_bytes_it_sends_before_the_first(client, session, reader, kind):
    for person in people(session, 7):
        ledger.record_opt_out(session, person.public_id, None, API)
    response = client.get("/api/v1/suppressions", headers={**reader, "Accept": kind}, buffered=True)
    body = response.get_data()
    lines = body.decode().splitlines()
    rows = lines[1:] if kind == "text/csv" else lines
    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == str(len(rows)) == "7"
    # a cut connection then shows as a short body, whatever the client
    assert response.headers["Content-Length"] == str(len(body))


def test_an_empty_export_counts_zero(client, session, reader):
    response = client.get("/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True)
    assert response.headers["X-Total-Count"] == "0"
    assert response.get_data(as_text=True) == "email,scope,reason,since\r\n"


@pytest.mark.parametrize("when", ["while it is read", "while it is sent"])
def test_an_export_is_one_snapshot_while_changes_are_written(reader_app_client, monkeypatch, when):
    monkeypatch.setattr(feeds, "STREAM_BATCH", 2)  # many batches, and changes between them
    app, client, headers = reader_app_client
    with app.app_context():
        from prefs.extensions import db

        crowd = people(db.session(), 10)
        for person in crowd[1:9]:
            ledger.record_opt_out(db.session(), person.public_id, None, API)
        before = [p.email for p in crowd[1:9]]
        first, still_in, last_out = crowd[0].public_id, crowd[9].public_id, crowd[8].public_id
        db.session.remove()
    batches = feeds.suppressions
    written = []

    def write_changes() -> None:
        # before the rows read so far, after them, and one taken off the list
        with Session(db.engine) as other:
            ledger.record_opt_out(other, first, None, API)
            ledger.record_opt_out(other, still_in, None, API)
            ledger.record_resubscribe(other, last_out, None, API)
        written.append(True)

    def writes_after_the_first_batch(session, topic_key, after, limit):
        if after > 0 and not written:
            write_changes()
        return batches(session, topic_key, after, limit)

    if when == "while it is read":
        monkeypatch.setattr(feeds, "suppressions", writes_after_the_first_batch)
    response = client.get("/api/v1/suppressions", headers={**headers, "Accept": "text/csv"})
    chunks = iter(response.response)
    received = next(chunks)  # the header and the first rows are on their way
    if when == "while it is sent":
        with app.app_context():
            write_changes()
    received += b"".join(chunks)
    response.close()
    assert written
    emails = [row["email"] for row in csv.DictReader(io.StringIO(received.decode()))]
    assert emails == before
    assert response.headers["X-Total-Count"] == str(len(before))


def test_an_export_that_fails_midway_is_no_200(client, session, reader, monkeypatch):
    monkeypatch.setattr(feeds, "STREAM_BATCH", 2)
    for person in people(session, 7):
        ledger.record_opt_out(session, person.public_id, None, API)
    batches = feeds.suppressions

    def connection_lost_at_the_third_batch(session, topic_key, after, limit):
        if after >= 4:
            raise OperationalError("SELECT", {}, ConnectionResetError("server closed the connection"))
        return batches(session, topic_key, after, limit)

    monkeypatch.setattr(feeds, "suppressions", connection_lost_at_the_third_batch)
    response = client.get("/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True)
    assert response.status_code == 503
    assert response.json["error"]["code"] == "unavailable"
    assert response.headers["Retry-After"]
    assert b"@example.com" not in response.get_data()


class _FullDisk(io.BytesIO):
    """A spool file on a disk that fills up after its first 100 bytes."""

    def write(self, data):
        if self.tell() + len(data) > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_an_export_with_no_room_for_its_file_is_a_503_and_the_next_one_works(
    client, session, reader, monkeypatch
):
    for person in people(session, 7):
        ledger.record_opt_out(session, person.public_id, None, API)
    monkeypatch.setattr(exports.tempfile, "TemporaryFile", _FullDisk)
    response = client.get("/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json["error"]["code"] == "unavailable"
    monkeypatch.undo()
    # the worker goes on: the next export, and writes, are as before
    whole = client.get("/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True)
    assert whole.status_code == 200 and whole.headers["X-Total-Count"] == "7"


def test_an_export_that_finds_no_turn_to_read_is_a_503(client, session, reader, monkeypatch):
    monkeypatch.setattr(exports, "TURN_WAIT", 0.05)
    others = Session(session.get_bind())
    with ExitStack() as reading:
        # every turn to read is taken by exports under way
        for _ in range(50):
            try:
                reading.enter_context(exports._turn(others))
            except Busy:
                break
        else:
            raise AssertionError("exports never ran out of turns")
        response = client.get("/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True)
        assert response.status_code == 503 and response.headers["Retry-After"]
    others.close()
    whole = client.get("/api/v1/suppressions", headers={**reader, "Accept": "text/csv"}, buffered=True)
    assert whole.status_code == 200


def test_a_caught_up_page_reads_no_events_it_does_not_return(session, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("the count of rows a statement read is PostgreSQL's (pg_stat_xact_user_tables)")
    make_topic(session, "news")
    for person in people(session, 3):
        ledger.record_opt_out(session, person.public_id, "news", API)
    # a history of 3,000 changes, then a mailer that has read it all
    session.execute(
        text(
            "INSERT INTO events (txid, subscriber_id, topic_id, action, source, created_at)"
            " SELECT 1, s.id, NULL, 'unsubscribe', 'import', now()"
            " FROM (SELECT min(id) AS id FROM subscribers) s, generate_series(1, 3000)"
        )
    )
    session.execute(text("ANALYZE events"))
    session.commit()
    cursor = None
    for _ in range(10):
        page = feeds.change_page(session, cursor, 1000)
        session.commit()
        cursor = page.next_cursor
        if not page.items:
            break
    # on a connection of its own: PostgreSQL counts a backend's reads until it reports them
    engine = create_engine(database_url)
    with Session(engine) as mailer:
        page = feeds.change_page(mailer, cursor, 1000)
        read = mailer.execute(
            text("SELECT seq_tup_read, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relname = 'events'")
        ).one()
    engine.dispose()
    assert page.items == []
    seq_read, fetched = read
    # no scan of the table; a few index probes by the planner (the range's end) at most
    assert seq_read == 0 and fetched < 10


def test_transactions_ending_elsewhere_meanwhile_do_not_hold_a_page_back(
    session, database_url, foreign_database
):
    """Short transactions come and go in another database: some end while a page is being read."""
    make_topic(session, "news")
    crowd = people(session, 40)
    cursor = feeds.change_page(session, None, 100).next_cursor
    session.commit()
    engine = create_engine(foreign_database, pool_size=4)
    stop = threading.Event()

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        with engine.connect() as conn:
            while not stop.is_set():
                conn.execute(text("SELECT pg_current_xact_id()"))
                stop.wait(rng.random() * 0.02)
                conn.commit()

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    held = []
    try:
        for person in crowd:
            ledger.record_opt_out(session, person.public_id, "news", API)
            page = feeds.change_page(session, cursor, 100)
            session.commit()
            cursor = page.next_cursor
            if [i["email"] for i in page.items] != [person.email]:
                held.append(person.email)
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        engine.dispose()
    assert held == []


def test_the_change_feed_refuses_a_snapshot_held_across_its_statements(session, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite's feed needs no horizon")
    with read_snapshot(session), pytest.raises(RuntimeError, match="READ COMMITTED"):
        feeds.change_page(session, None, 10)
