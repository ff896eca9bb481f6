"""SQLite is durable and takes the write lock up front; writes commit before returning."""

import importlib

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from prefs.extensions import db
from prefs.store import driver_rows, driver_rows_meanwhile, read_snapshot, run_committed, write_transaction

# the module, not the Flask-SQLAlchemy extension that prefs exports as ``db``
db_module = importlib.import_module("prefs.store.transactions")


def test_sqlite_pragmas_are_set_on_every_connection(app, session):
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("SQLite's pragmas")
    with db.engine.connect() as conn:
        # a deleted row's bytes are overwritten, whatever this build's default
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_write_transactions_begin_immediate(app, session):
    if session.get_bind().dialect.name != "sqlite":
        pytest.skip("BEGIN IMMEDIATE is SQLite's; PostgreSQL takes row locks as it writes")
    statements = []

    from sqlalchemy import event

    @event.listens_for(db.engine, "before_cursor_execute")
    def record(conn, cursor, statement, *args):
        statements.append(statement)

    session.execute(text("SELECT 1"))
    with write_transaction(session):
        session.execute(text("SELECT 2"))
    event.remove(db.engine, "before_cursor_execute", record)
    assert "BEGIN" in statements and "BEGIN IMMEDIATE" in statements
    assert statements.index("BEGIN IMMEDIATE") > statements.index("BEGIN")


def test_a_write_transaction_is_committed_when_it_returns(app, session):
    from prefs.models import InstanceSecret

    with write_transaction(session):
        session.add(InstanceSecret(name="probe", value="1"))
    # another connection sees it at once
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM instance_secrets WHERE name='probe'")).scalar() == "1"


def test_a_failed_write_transaction_is_rolled_back(app, session):
    from prefs.models import InstanceSecret

    try:
        with write_transaction(session):
            session.add(InstanceSecret(name="probe", value="1"))
            session.flush()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM instance_secrets")).scalar() == 0


def test_a_nested_write_transaction_joins_the_outer_one(app, session):
    # the inner block used to commit the outer transaction half-way (and, with the
    # writers' queue, to wait on itself)
    from prefs.models import InstanceSecret

    try:
        with write_transaction(session):
            session.add(InstanceSecret(name="outer", value="1"))
            with write_transaction(session):
                session.add(InstanceSecret(name="inner", value="2"))
            raise RuntimeError("the outer transaction fails after the inner block")
    except RuntimeError:
        pass
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM instance_secrets")).scalar() == 0


def test_the_fingerprint_key_can_be_made_inside_a_write_transaction(app, session):
    from prefs.domain import privacy

    with write_transaction(session):
        key = privacy.fingerprint_key(session)
    assert privacy.fingerprint_key(session) == key


def test_driver_errors_in_bulk_reads_become_sqlalchemy_errors(app, session):
    from sqlalchemy.exc import DBAPIError

    from prefs.store import driver_rows

    with pytest.raises(DBAPIError) as err:
        driver_rows(session, "SELECT * FROM no_such_table", ())
    # the driver's own exception is kept as the cause, as SQLAlchemy does for every statement
    assert isinstance(err.value.orig, session.get_bind().dialect.loaded_dbapi.Error)
    session.rollback()
    assert driver_rows(session, "SELECT 1", ()) == [(1,)]


def test_a_bulk_read_error_keeps_its_addresses_out_of_the_message(app, session):
    # found in a benchmark's log: a failed lookup logged its parameters, and SQLAlchemy's
    # truncation of the long list cut "[email]" masking short, leaving "...@example9.com"
    from sqlalchemy.exc import DBAPIError

    from prefs.store import driver_rows

    mark = "%s" if session.get_bind().dialect.name == "postgresql" else "?"
    addresses = [f"person{i}@example{i}.com" for i in range(300)]
    with pytest.raises(DBAPIError) as err:
        driver_rows(session, f"SELECT * FROM no_such_table WHERE x IN ({','.join([mark] * 300)})", addresses)
    session.rollback()
    assert "@example" not in str(err.value)
    assert "person1" not in str(err.value)


def test_pipelined_statements_return_every_rows_and_call_meanwhile_once(app, session):
    mark = "%s" if session.get_bind().dialect.name == "postgresql" else "?"
    calls = []
    with write_transaction(session):
        rows = driver_rows_meanwhile(
            session, f"SELECT {mark} + 1", [(1,), (2,), (3,)], lambda: calls.append("meanwhile")
        )
    assert rows == [(2,), (3,), (4,)]
    assert calls == ["meanwhile"]
    assert driver_rows(session, "SELECT 1", ()) == [(1,)]  # the connection is back to normal


def test_on_postgresql_meanwhile_runs_while_the_server_works_on_the_statements(app, session):
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the pipeline is PostgreSQL's; SQLite runs the statements in this process")
    backend = driver_rows(session, "SELECT pg_backend_pid()", ())[0][0]
    seen = []

    def meanwhile() -> None:
        # from another connection: what the first one's server process is doing now
        with db.engine.connect() as other:
            seen.append(
                other.exec_driver_sql(
                    "SELECT state, query FROM pg_stat_activity WHERE pid = %(pid)s", {"pid": backend}
                ).one()
            )

    rows = driver_rows_meanwhile(session, "SELECT 7 FROM pg_sleep(%s)", [(1,)], meanwhile)
    session.commit()
    assert rows == [(7,)]
    ((state, query),) = seen
    assert state == "active" and "pg_sleep" in query


def test_a_pipelined_statement_that_fails_raises_sqlalchemys_error(app, session):
    from sqlalchemy.exc import DBAPIError

    with pytest.raises(DBAPIError) as err, write_transaction(session):
        driver_rows_meanwhile(session, "SELECT * FROM no_such_table", [(), ()], lambda: None)
    assert isinstance(err.value.orig, session.get_bind().dialect.loaded_dbapi.Error)
    assert driver_rows(session, "SELECT 1", ()) == [(1,)]


def test_a_write_lock_that_cannot_be_made_is_the_database_being_unavailable(tmp_path):
    from sqlalchemy.exc import OperationalError

    from prefs.store import WriteGate

    gate = WriteGate(str(tmp_path / "no such folder" / "prefs.sqlite3"), timeout=1)
    with pytest.raises(OperationalError), gate.held():  # answered 503, as any outage, never 500
        pass


def test_a_uri_filename_shares_its_write_lock_with_the_plain_path(make_app, tmp_path):
    from prefs.store import gate_of

    path = tmp_path / "uri.sqlite3"
    plain = make_app(DATABASE_URL=f"sqlite:///{path}")
    uri = make_app(DATABASE_URL=f"sqlite:///file:{path}?mode=rw&uri=true")
    with plain.app_context():
        plain_gate = gate_of(db.engine)
    with uri.app_context():
        uri_gate = gate_of(db.engine)
        with write_transaction(db.session()):
            db.session().execute(text("SELECT 1"))
    assert uri_gate._path == plain_gate._path == f"{path}.write-lock"


class Refused(Exception):
    """A driver's error with PostgreSQL's SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def test_a_deadlock_is_tried_again_a_few_times_then_raised(app, session, monkeypatch):
    monkeypatch.setattr(db_module, "back_off", lambda attempt: None)
    tries = []

    def work(fail: int, sqlstate: str, name: str = "") -> str:
        tries.append(sqlstate)
        insert = text("INSERT INTO instance_secrets (name, value) VALUES (:n, 'v')")
        session.execute(insert, {"n": name or sqlstate})
        if tries.count(sqlstate) <= fail:
            raise OperationalError("INSERT", None, Refused(sqlstate))
        return "done"

    # a deadlock, a serialization failure: the transaction is rolled back and run again
    assert run_committed(session, lambda: work(2, "40P01")) == "done"
    assert run_committed(session, lambda: work(1, "40001")) == "done"
    assert tries.count("40P01") == 3 and tries.count("40001") == 2
    # one that persists is raised after a few tries; anything else at once
    with pytest.raises(OperationalError):
        run_committed(session, lambda: work(9, "40P02"))
    with pytest.raises(OperationalError):
        run_committed(session, lambda: work(9, "55P03"))
    assert tries.count("40P02") == 1 and tries.count("55P03") == 1
    tries.clear()
    with pytest.raises(OperationalError):
        run_committed(session, lambda: work(9, "40001", "again"))
    assert len(tries) == db_module.CONFLICT_TRIES
    names = session.execute(text("SELECT name FROM instance_secrets")).scalars()
    # each committed once, the failed tries rolled back
    assert sorted(set(names) & {"40001", "40P01", "40P02", "55P03", "again"}) == ["40001", "40P01"]


def test_a_read_snapshot_ends_with_its_block_and_leaves_writes_as_they_were(app, session):
    postgresql = session.get_bind().dialect.name == "postgresql"
    with read_snapshot(session):
        if postgresql:
            assert session.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"
            assert session.execute(text("SHOW transaction_read_only")).scalar() == "on"
        session.execute(text("SELECT count(*) FROM subscribers")).scalar()
    assert not session.in_transaction()
    # the pooled connection the snapshot used takes writes again, at the usual isolation
    with write_transaction(session):
        session.execute(text("UPDATE subscribers SET version = version + 1"))
        if postgresql:
            assert session.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
