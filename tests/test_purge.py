"""What an erasure leaves in the database's own files: SQLite's file and WAL, PostgreSQL's relations."""

from pathlib import Path

import pytest
from sqlalchemy import text

from prefs.domain import ledger
from prefs.domain.changes import Origin
from prefs.domain.compliance import requests as register
from tests.factories import bearer, make_key, make_subscriber, make_topic

ANNA = "anna@xn--bcher-kva.example.com"
# every form the bytes of an erased address could take on disk
FORMS = {
    ANNA: (ANNA, "anna@bücher.example.com", "Anna@Bücher.Example.com"),
    "bob.builder@example.com": ("bob.builder@example.com", "Bob.Builder@Example.com"),
}


def churn(session, count=40):
    """Make neighbours and changes, so pages and WAL frames hold many rows besides the erased ones."""
    make_topic(session, "news")
    make_topic(session, "promo")
    people = [make_subscriber(session, f"neighbour{i:03d}@example.com") for i in range(count)]
    erased = [make_subscriber(session, address) for address in FORMS]  # the newest rows of their pages
    for person in [*people[:5], *erased]:
        ledger.record_opt_out(session, person.public_id, "news", Origin("page", campaign="c1"))
        ledger.record_resubscribe(session, person.public_id, "news", Origin("preferences"))
        ledger.record_opt_out(session, person.public_id, None, Origin("api"), reason="complained")
    register.record_request(
        session, "access", "Anna@Bücher.Example.com", note="Anna@Bücher.Example.com wrote in"
    )
    session.commit()


def erase_both(client, session):
    """Erase anna by the API's DELETE, and bob by completing an erasure request."""
    admin = bearer(make_key(session, "admin"))
    item = register.record_request(
        session, "erasure", "Bob.Builder@Example.com", note="Bob.Builder@Example.com phoned"
    )
    request_id = item.id
    session.commit()  # no read left open: a checkpoint waits for readers
    assert client.delete("/api/v1/subscribers/Anna@Bücher.Example.com", headers=admin).status_code == 204
    assert client.post(f"/api/v1/requests/{request_id}/complete", headers=admin).status_code == 200
    session.commit()  # the test client shares the test's session: end what the views read


def copies(data: bytes) -> dict[str, int]:
    """Return how many times each form of each erased address appears in ``data``."""
    found = {}
    for forms in FORMS.values():
        for form in forms:
            for encoded in {form.encode(), form.lower().encode()}:
                if data.count(encoded):
                    found[encoded.decode()] = data.count(encoded)
    return found


def sqlite_files(database_url: str) -> dict[str, Path]:
    path = Path(database_url.removeprefix("sqlite:///"))
    return {suffix or "main": path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")}


def test_an_erasure_leaves_no_copy_in_the_sqlite_files(app, client, session, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's own files (PostgreSQL's relations: the purge test below)")
    churn(session)
    erase_both(client, session)
    session.commit()
    found = {
        name: copies(path.read_bytes()) for name, path in sqlite_files(database_url).items() if path.exists()
    }
    assert found == {"main": {}, "-wal": {}, "-shm": {}}


def test_erasures_purge_empties_the_sqlite_wal(app, runner, session, database_url):
    if not database_url.startswith("sqlite"):
        pytest.skip("SQLite's WAL")
    churn(session, count=5)
    session.commit()
    wal = sqlite_files(database_url)["-wal"]
    assert wal.stat().st_size > 0
    result = runner.invoke(args=["erasures", "purge"])
    assert result.exit_code == 0, result.output
    assert wal.stat().st_size == 0
    assert "checkpoint" in result.output


def relation_files(session) -> dict[str, bytes]:
    """Return the bytes on disk of every table that held an address, its indexes and its TOAST."""
    session.commit()
    session.execute(text("CHECKPOINT"))  # what is in shared buffers reaches the files
    data_directory = Path(session.execute(text("SHOW data_directory")).scalar())
    tables = "SELECT oid FROM pg_class WHERE relname IN ('subscribers', 'requests')"
    toast = f"SELECT reltoastrelid FROM pg_class WHERE oid IN ({tables})"
    indexes = f"SELECT indexrelid FROM pg_index WHERE indrelid IN ({tables}) OR indrelid IN ({toast})"
    rows = session.execute(
        text(
            "SELECT c.oid::regclass::text, pg_relation_filepath(c.oid) FROM pg_class c"
            f" WHERE c.oid IN ({tables}) OR c.oid IN ({toast}) OR c.oid IN ({indexes})"
        )
    ).all()
    session.commit()
    files = {}
    for name, path in rows:
        main = data_directory / path
        # the main fork and its 1 GB segments (path, path.1, ...), not the free space and visibility maps
        segments = [main, *sorted(main.parent.glob(main.name + ".*"))]
        files[name] = b"".join(p.read_bytes() for p in segments)
    assert any(name == "subscribers" for name in files) and len(files) >= 6
    return files


def postgresql_only(database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's relation files (SQLite's files: the tests above)")
    if not Path("/proc/self").exists():
        pytest.skip("the server's files must be on this machine")


def test_erasures_purge_leaves_no_copy_in_any_index_on_postgresql(app, client, runner, session, database_url):
    postgresql_only(database_url)
    churn(session)
    erase_both(client, session)
    before = {name: copies(data) for name, data in relation_files(session).items()}
    assert any(before.values())  # the dead rows and index entries are there to be cleared
    result = runner.invoke(args=["erasures", "purge"])
    assert result.exit_code == 0, result.output
    after = {name: copies(data) for name, data in relation_files(session).items()}
    # every index is rebuilt; a table page may keep a dead row's bytes in its free space
    assert {
        name: found for name, found in after.items() if found and name not in ("subscribers", "requests")
    } == {}
    assert after["requests"] == {}, after  # the register is rewritten whole


def test_erasures_purge_full_leaves_no_copy_in_any_file_on_postgresql(
    app, client, runner, session, database_url
):
    postgresql_only(database_url)
    churn(session)
    erase_both(client, session)
    result = runner.invoke(args=["erasures", "purge", "--full"])
    assert result.exit_code == 0, result.output
    after = {name: copies(data) for name, data in relation_files(session).items()}
    assert {name: found for name, found in after.items() if found} == {}
