"""Requests sent again under one idempotency key: the first answer, kept in the same transaction."""

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from prefs.domain import idempotency
from prefs.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from prefs.extensions import db
from prefs.models import Event, IdempotencyKey, utcnow
from tests.factories import bearer, make_key, make_subscriber, make_topic

SCOPE = "events:1"


def recorder(session, answers):
    """Return work that writes one row and answers with the next of ``answers``."""
    calls = []

    def work():
        calls.append(1)
        session.execute(
            text("INSERT INTO instance_secrets (name, value) VALUES (:n, 'v')"), {"n": f"w{len(calls)}"}
        )
        return 200, answers[len(calls) - 1]

    return work, calls


def secrets_written(session):
    return session.scalar(text("SELECT count(*) FROM instance_secrets WHERE name LIKE 'w%'"))


def test_the_same_key_and_request_get_the_first_answer_and_run_nothing(session):
    work, calls = recorder(session, ["first", "second"])
    first = idempotency.once(session, SCOPE, "k1", "r1", work)
    again = idempotency.once(session, SCOPE, "k1", "r1", work)
    assert (first.status, first.body, first.replayed) == (200, "first", False)
    assert (again.status, again.body, again.replayed) == (200, "first", True)
    assert idempotency.kept(session, SCOPE, "k1", "r1") == again
    assert calls == [1] and secrets_written(session) == 1


def test_the_same_key_with_another_request_is_refused(session):
    work, calls = recorder(session, ["first", "second"])
    idempotency.once(session, SCOPE, "k1", "r1", work)
    with pytest.raises(IdempotencyKeyReused):
        idempotency.once(session, SCOPE, "k1", "r2", work)
    with pytest.raises(IdempotencyKeyReused):
        idempotency.kept(session, SCOPE, "k1", "r2")
    assert calls == [1]


def test_keys_are_scoped_and_only_their_hashes_are_kept(session):
    work, calls = recorder(session, ["first", "second"])
    idempotency.once(session, "events:1", "my-key-01", "r1", work)
    other = idempotency.once(session, "events:2", "my-key-01", "r1", work)
    assert other.body == "second" and not other.replayed and calls == [1, 1]
    rows = session.execute(select(IdempotencyKey.key_hash, IdempotencyKey.request_hash)).all()
    assert {row.key_hash for row in rows} == {idempotency.digest("my-key-01")}
    assert "my-key-01" not in " ".join(str(v) for row in rows for v in row)


def test_a_failed_request_keeps_nothing_and_its_retry_runs(session):
    def failing():
        session.execute(text("INSERT INTO instance_secrets (name, value) VALUES ('w-failed', 'v')"))
        raise OperationalError("INSERT", None, TimeoutError("the database is busy"))

    with pytest.raises(OperationalError):
        idempotency.once(session, SCOPE, "k1", "r1", failing)
    assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
    work, _ = recorder(session, ["first"])
    assert idempotency.once(session, SCOPE, "k1", "r1", work).body == "first"
    assert secrets_written(session) == 1  # the failed one's row was rolled back with its key


def test_after_24_hours_a_key_is_new_again_and_expired_keys_are_swept_in_bounded_steps(session):
    now = utcnow()
    long_ago = now - idempotency.TTL - timedelta(minutes=1)
    work, _ = recorder(session, [f"answer{n}" for n in range(400)])
    for n in range(idempotency.SWEEP + 50):
        idempotency.once(session, SCOPE, f"old{n}", "r", work, now=long_ago)
    assert idempotency.kept(session, SCOPE, "old0", "r", now=now) is None
    # another request under an expired key is a new one, and each new key sweeps some old ones
    again = idempotency.once(session, SCOPE, "old0", "r2", work, now=now)
    assert not again.replayed and again.body == f"answer{idempotency.SWEEP + 50}"
    expired = select(func.count()).where(IdempotencyKey.created_at < now - idempotency.TTL)
    assert session.scalar(expired) == 50 - 1  # one taken again, SWEEP deleted: no more by one request
    idempotency.once(session, SCOPE, "new", "r", work, now=now)
    assert session.scalar(expired) == 0
    assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 2


def test_two_requests_with_one_key_at_once_apply_once(app, session):
    entered, release = threading.Event(), threading.Event()
    answers = {}

    def first_work():
        entered.set()
        assert release.wait(10)
        db.session().execute(text("INSERT INTO instance_secrets (name, value) VALUES ('w1', 'v')"))
        return 200, "first"

    def second_work():
        db.session().execute(text("INSERT INTO instance_secrets (name, value) VALUES ('w2', 'v')"))
        return 200, "second"

    def run(name, work):
        with app.app_context():
            answers[name] = idempotency.once(db.session(), SCOPE, "k", "r", work)

    first = threading.Thread(target=run, args=("first", first_work))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=run, args=("second", second_work))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waits for the first, which holds the key
    release.set()
    first.join(10)
    second.join(10)
    assert answers["first"].body == answers["second"].body == "first"
    assert answers["second"].replayed
    assert secrets_written(session) == 1


def test_a_key_held_past_the_busy_timeout_is_a_clear_conflict(make_app):
    app = make_app(DB_BUSY_TIMEOUT_MS=300)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        pytest.skip("SQLite's one write lock: a write held past the busy timeout is an outage (503)")
    entered, release = threading.Event(), threading.Event()

    def held():
        entered.set()
        assert release.wait(10)
        return 200, "first"

    def run():
        with app.app_context():
            idempotency.once(db.session(), SCOPE, "k", "r", held)

    first = threading.Thread(target=run)
    first.start()
    assert entered.wait(10)
    try:
        with app.app_context(), pytest.raises(IdempotencyKeyInUse):
            idempotency.once(db.session(), SCOPE, "k", "r", lambda: (200, "second"))
    finally:
        release.set()
        first.join(10)


# over HTTP


def events_body(*emails):
    return {"events": [{"type": "unsubscribe", "email": e, "topic": "news"} for e in emails]}


def test_events_sent_again_with_the_key_get_the_first_answer_byte_for_byte(client, session):
    make_topic(session, "news")
    make_subscriber(session, "ann@example.com")
    key = bearer(make_key(session, "write"))
    headers = {**key, "Idempotency-Key": "8e03978e-40d5-43e8-bc93-6894a57f9324"}
    first = client.post(
        "/api/v1/events", json=events_body("ann@example.com", "bob@example.com"), headers=headers
    )
    # the same request again: spacing and key order do not matter, and a quoted key is the same key
    quoted = {**key, "Idempotency-Key": '"8e03978e-40d5-43e8-bc93-6894a57f9324"'}
    again = client.post(
        "/api/v1/events",
        data='{"events": [{"topic": "news", "type": "unsubscribe", "email": "ann@example.com"},'
        ' {"email": "bob@example.com", "type": "unsubscribe", "topic": "news"}]}',
        content_type="application/json",
        headers=quoted,
    )
    assert first.status_code == again.status_code == 200
    assert first.get_data() == again.get_data()
    assert first.json["results"] == [{"status": "accepted", "changed": True}] * 2
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert session.scalar(select(func.count()).select_from(Event)) == 2
    # the same key with another request
    other = client.post("/api/v1/events", json=events_body("ann@example.com"), headers=headers)
    assert other.status_code == 422 and other.json["error"]["code"] == "idempotency_key_reused"
    # without a key it is a new request, which changes nothing now
    plain = client.post("/api/v1/events", json=events_body("ann@example.com"), headers=key)
    assert plain.json["results"] == [{"status": "accepted", "changed": False}]


def test_keys_are_per_api_key(client, session):
    make_topic(session, "news")
    one, two = bearer(make_key(session, "write", name="one")), bearer(make_key(session, "write", name="two"))
    body = events_body("ann@example.com")
    first = client.post("/api/v1/events", json=body, headers={**one, "Idempotency-Key": "k"})
    second = client.post("/api/v1/events", json=body, headers={**two, "Idempotency-Key": "k"})
    assert first.json["results"][0]["changed"] is True
    assert second.json["results"][0]["changed"] is False and "Idempotent-Replayed" not in second.headers


@pytest.mark.parametrize("value", ["", '""', " ", "x" * 256, "caf\u00e9", "a\u0000b"])
def test_a_malformed_key_is_400(client, session, value):
    key = bearer(make_key(session, "write"))
    response = client.post(
        "/api/v1/events",
        json=events_body("ann@example.com"),
        headers={**key, "Idempotency-Key": value.encode().decode("latin-1")},
    )
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_idempotency_key"
    assert session.scalar(select(func.count()).select_from(Event)) == 0
