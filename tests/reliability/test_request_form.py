"""The request form (``POST /unsubscribe``) tells nobody who is on file, whatever the database does.

Known, new and erased addresses get the same status, the same page size and the same
time, with the database healthy, on a full disk, read-only, locked by another session, or
down. SQLite's file sits on a small tmpfs of the test's own; the stopped PostgreSQL is a
throwaway cluster of the test's own.
"""

from __future__ import annotations

import contextlib
import sqlite3
import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from sqlalchemy import create_engine, make_url, text

from prefs.domain import privacy
from prefs.extensions import db
from prefs.models import ErasedAddress
from tests.conftest import SERVER_URL, drop_postgresql_database, fresh_postgresql_database
from tests.disks import fill, small_disk
from tests.reliability.figures import report
from tests.reliability.harness import FORM, Cluster, Outcome, Service, seed, timed

pytestmark = pytest.mark.reliability

ROUNDS = 3
WARM = 8
FLOOR = 0.3  # PREFS_REQUEST_MIN_SECONDS
SAME_TIME = 0.15  # the medians of the kinds of address differ by less than this
# each condition, and the databases it is tried on
CONDITIONS = {
    "healthy": ("sqlite", "postgresql"),
    "full disk": ("sqlite",),
    "read-only": ("sqlite", "postgresql"),
    "locked": ("sqlite", "postgresql"),
    "down": ("postgresql",),
}
KINDS = ("known", "new", "erased")


def address(kind: str, n: int) -> str:
    # one mask for every one of them: a***@example.com
    return f"a{kind[0]}{n}@example.com"


def erase(app, addresses: list[str]) -> None:
    """Erase addresses as the API does: only their keyed fingerprints stay."""
    with app.app_context():
        session = db.session()
        key = privacy.fingerprint_key(session)
        session.add_all(ErasedAddress(fingerprint=privacy.address_fingerprint(key, a)) for a in addresses)
        session.commit()
        db.session.remove()
        db.engine.dispose()


@contextmanager
def database(condition: str, tmp_path: Path) -> Iterator[tuple[str, Cluster | None]]:
    """Yield an empty database for the condition, and the cluster it is on when it is ours."""
    with ExitStack() as stack:
        if not SERVER_URL:
            disk = stack.enter_context(small_disk(tmp_path / "db", size="2m"))
            yield f"sqlite:///{disk / 'prefs.sqlite3'}", None
        elif condition == "down":
            cluster = Cluster()
            stack.callback(cluster.remove)
            cluster.start()
            yield fresh_postgresql_database(cluster.url, "prefs_form"), cluster
        else:
            url = fresh_postgresql_database(SERVER_URL, "prefs_form")
            stack.callback(drop_postgresql_database, url)
            yield url, None


def sqlite_path(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


@contextmanager
def held(condition: str, url: str, cluster: Cluster | None) -> Iterator[None]:
    """Put the database in the condition while the block runs."""
    if condition == "full disk":
        fill(sqlite_path(url).parent)
        yield
    elif condition == "locked" and url.startswith("sqlite"):
        holder = sqlite3.connect(sqlite_path(url), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write, held past the busy timeout
        try:
            yield
        finally:
            holder.rollback()
            holder.close()
    elif condition == "locked":
        engine = create_engine(url)
        with engine.connect() as conn:
            # as CREATE INDEX does: reads go on, writes wait
            conn.execute(text("LOCK TABLE subscribers IN SHARE MODE"))
            try:
                yield
            finally:
                conn.rollback()
        engine.dispose()
    elif condition == "down":
        assert cluster is not None
        cluster.stop()
        yield
    else:
        yield


def read_only_postgresql(url: str) -> None:
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'))
    admin.dispose()


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_the_request_form_tells_nobody_who_is_on_file(condition, tmp_path, smtp_server):
    kind_of_database = "postgresql" if SERVER_URL else "sqlite"
    if kind_of_database not in CONDITIONS[condition]:
        pytest.skip(f"the database {condition} is tried on {' and '.join(CONDITIONS[condition])} only")
    with database(condition, tmp_path) as (url, cluster):
        known = [address("known", n) for n in range(ROUNDS)]
        erased = [address("erased", n) for n in range(ROUNDS)]
        app, _ = seed(url, tmp_path / "instance", known)
        erase(app, erased)
        served = url
        if condition == "read-only" and kind_of_database == "postgresql":
            read_only_postgresql(url)
        elif condition == "read-only":
            # SQLite opens the file read-only: it reads, and refuses every write
            served = f"sqlite:///file:{sqlite_path(url)}?mode=ro&uri=true"
        service = Service(
            served,
            tmp_path,
            PREFS_REQUEST_MIN_SECONDS=str(FLOOR),
            PREFS_DB_BUSY_TIMEOUT_MS="1000",
            PREFS_SMTP_URL=smtp_server.url,
            PREFS_MAIL_FROM="Example <no-reply@example.com>",
            PREFS_BASE_URL="http://127.0.0.1",
            PREFS_RATELIMIT_PER_CLIENT="1000 per hour",
            PREFS_RATELIMIT_PER_ADDRESS="1000 per hour",
        ).start()
        outcomes: list[tuple[str, Outcome]] = []
        try:
            with held(condition, url, cluster):
                for n in range(WARM):  # each worker has answered the form before the figures count
                    body = urlencode({"email": f"warm{n}@example.org"})
                    timed(service.base, "POST", "/unsubscribe", body=body, headers=FORM)
                smtp_server.inbox.messages.clear()
                for n in range(ROUNDS):
                    for kind in KINDS[n % 3 :] + KINDS[: n % 3]:  # each kind first in turn
                        body = urlencode({"email": address(kind, n)})
                        answer = timed(service.base, "POST", "/unsubscribe", body=body, headers=FORM)
                        outcomes.append((kind, answer))
            with contextlib.suppress(AssertionError):  # counted below, once the figures are out
                smtp_server.inbox.wait_for(len(outcomes), timeout=5)
            mails = list(smtp_server.inbox.messages)
            links = [
                line
                for mail in mails
                for line in mail.get_body(("plain",)).get_content().split()
                if line.startswith("http://127.0.0.1/p/")
            ]
            opened = [timed(service.base, "GET", urlsplit(link).path).status for link in links]
        finally:
            service.stop()

    statuses = {o.status for _, o in outcomes}
    sizes = {len(o.body) for _, o in outcomes}
    medians = {k: statistics.median(o.elapsed for kind, o in outcomes if kind == k) for k in KINDS}
    server_errors = [o for _, o in outcomes if (o.status or 0) >= 500]
    report(
        f"request form, database {condition}",
        len(outcomes),
        sum(o.status == 200 for _, o in outcomes),
        0,
        len(server_errors),
        f"request form ({condition}): statuses {sorted(map(str, statuses))}, sizes {sorted(sizes)}, "
        + ", ".join(f"{k} {medians[k] * 1000:.0f} ms" for k in KINDS)
        + f", {len(mails)} mails, {len(links)} links",
    )
    assert len(statuses) == 1 and len(sizes) == 1, (statuses, sizes)
    assert max(medians.values()) - min(medians.values()) < SAME_TIME, medians
    assert min(medians.values()) >= FLOOR * 0.95
    # a database that is down or locked for everyone: the same 503 for everyone, and no mail;
    # otherwise everyone is answered as usual and told by mail: a link, or to ask again
    assert statuses <= {200, 503}
    assert len(mails) == (len(outcomes) if statuses == {200} else 0)
    assert all(status == 200 for status in opened)  # every link mailed opens the preferences
    if condition == "healthy":
        assert len(links) == 2 * ROUNDS  # known and new get their link; erased a note
