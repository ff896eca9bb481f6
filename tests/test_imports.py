"""Importing suppression lists from other services: every format, idempotent, never resubscribing."""

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text

from prefs.domain import imports, ledger
from prefs.domain.changes import Origin
from prefs.domain.compliance import subjects
from prefs.domain.import_formats import detect, parse_time, read_rows
from prefs.domain.privacy import address_fingerprint, address_fingerprinter
from prefs.models import Event, Preference, Subscriber
from tests.factories import make_subscriber, make_topic

SENDGRID = """\
email,created
ann@example.com,1700000000
Bob@Example.com,1700000100
not-an-address,1700000200
"""
# Mailchimp's export of an audience's unsubscribed and cleaned members
MAILCHIMP_COMMON = (
    '"Email Address","First Name","Last Name","MEMBER_RATING","OPTIN_TIME","OPTIN_IP",'
    '"CONFIRM_TIME","CONFIRM_IP","LATITUDE","LONGITUDE","GMTOFF","DSTOFF","TIMEZONE","CC","REGION",'
)
MAILCHIMP_UNSUBSCRIBED = (
    MAILCHIMP_COMMON
    + '"UNSUB_TIME","UNSUB_CAMPAIGN_TITLE","UNSUB_CAMPAIGN_ID","UNSUB_REASON","UNSUB_REASON_OTHER",'
    + '"LEID","EUID","NOTES"\n'
    + 'ann@example.com,Ann,A,2,"2020-01-01 10:00:00",,"2020-01-01 10:05:00",,,,,,,,,'
    + '"2023-05-04 12:00:00","May news",a1b2c3d4e5,"I no longer want to receive these emails",,111,aaa,\n'
    + 'cat@example.com,Cat,C,1,"2020-01-01 10:00:00",,"2020-01-01 10:05:00",,,,,,,,,'
    + '"2023-05-05 08:30:00","May news",a1b2c3d4e5,"The emails are spam and should be reported",,112,aab,\n'
)
MAILCHIMP_CLEANED = (
    MAILCHIMP_COMMON
    + '"CLEAN_TIME","CLEAN_CAMPAIGN_TITLE","CLEAN_CAMPAIGN_ID","LEID","EUID","NOTES"\n'
    + 'dan@example.com,Dan,D,1,"2020-01-01 10:00:00",,,,,,,,,,,'
    + '"2023-06-01 00:00:00","June news",f6e5d4c3b2,113,aac,\n'
)
POSTMARK = """\
EmailAddress,SuppressionReason,Origin,CreatedAt
ann@example.com,HardBounce,Recipient,2019-12-10T08:58:33-05:00
eve@example.com,SpamComplaint,Recipient,2019-12-11T10:00:00-05:00
fay@example.com,ManualSuppression,Customer,2019-12-12T10:00:00-05:00
"""
MAILGUN = """\
address,tags,created_at
gil@example.com,*,"Fri, 21 Oct 2011 11:02:55 UTC"
hal@example.com,newsletter,"Sat, 22 Oct 2011 11:02:55 UTC"
"""
PLAIN = """\
ivy@example.com

# a comment
JAY@example.com
bad@@example.com
"""


def write(tmp_path, text, name="list.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run(session, path, **kwargs):
    with path.open(newline="", encoding="utf-8-sig") as f:
        return imports.import_file(session, f, **kwargs)


def state(session, email):
    return session.scalar(select(Subscriber).where(Subscriber.email == email))


@pytest.mark.parametrize(
    ("text", "fmt"),
    [
        (SENDGRID, "sendgrid"),
        (MAILCHIMP_UNSUBSCRIBED, "mailchimp"),
        (MAILCHIMP_CLEANED, "mailchimp"),
        (POSTMARK, "postmark"),
        (MAILGUN, "mailgun"),
        (PLAIN, "plain"),
    ],
)
def test_the_format_is_told_from_the_header(tmp_path, text, fmt):
    with write(tmp_path, text).open(newline="") as f:
        assert read_rows(f)[0] == fmt


def test_an_unknown_header_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="--format"):
        detect(["name", "phone"])


def test_sendgrid_keeps_the_time_and_counts_invalid_lines(session, tmp_path):
    make_topic(session, "news")
    summary = run(session, write(tmp_path, SENDGRID))
    assert (summary.format, summary.read, summary.added, summary.already) == ("sendgrid", 3, 2, 0)
    assert (summary.invalid, summary.invalid_lines) == (1, [4])
    bob = state(session, "bob@example.com")
    assert bob.left_all_reason == "imported"
    assert bob.left_all_at == datetime.fromtimestamp(1700000100, UTC)
    assert bob.version == 1 and bob.left_all_version == 1
    event = session.scalar(select(Event).where(Event.subscriber_id == bob.id))
    assert (event.action, event.source, event.reason, event.topic_id) == (
        "unsubscribe",
        "import",
        "imported",
        None,
    )
    assert event.created_at == datetime.fromtimestamp(1700000100, UTC)
    assert ledger.verdict_for(session, "bob@example.com", "news").reason == "unsubscribed_all"
    assert ledger.verdict_for(session, "bob@example.com", "transactional").allowed


def test_mailchimp_unsubscribed_and_cleaned(session, tmp_path):
    make_topic(session, "news")
    run(session, write(tmp_path, MAILCHIMP_UNSUBSCRIBED))
    run(session, write(tmp_path, MAILCHIMP_CLEANED, "cleaned.csv"))
    assert state(session, "ann@example.com").left_all_reason == "imported"
    assert state(session, "cat@example.com").left_all_reason == "complained"
    dan = state(session, "dan@example.com")
    assert dan.left_all_reason == "bounced"
    assert dan.left_all_at == datetime(2023, 6, 1, tzinfo=UTC)
    assert session.scalar(select(Event.campaign).where(Event.subscriber_id == dan.id)) == "f6e5d4c3b2"
    assert ledger.verdict_for(session, "cat@example.com", "news").reason == "complained"


def test_postmark_reasons(session, tmp_path):
    summary = run(session, write(tmp_path, POSTMARK))
    assert summary.added == 3
    assert state(session, "ann@example.com").left_all_reason == "bounced"
    assert state(session, "eve@example.com").left_all_reason == "complained"
    assert state(session, "fay@example.com").left_all_reason == "imported"
    assert state(session, "ann@example.com").left_all_at == datetime(2019, 12, 10, 13, 58, 33, tzinfo=UTC)


def test_mailgun_and_plain(session, tmp_path):
    assert run(session, write(tmp_path, MAILGUN)).added == 2
    assert state(session, "gil@example.com").left_all_at == datetime(2011, 10, 21, 11, 2, 55, tzinfo=UTC)
    summary = run(session, write(tmp_path, PLAIN, "plain.txt"))
    assert (summary.format, summary.read, summary.added, summary.invalid_lines) == ("plain", 3, 2, [5])
    assert state(session, "jay@example.com").left_all_reason == "imported"


def test_a_second_run_changes_nothing(session, tmp_path):
    path = write(tmp_path, POSTMARK)
    run(session, path)
    events = session.scalar(select(func.count()).select_from(Event))
    versions = session.execute(select(Subscriber.email, Subscriber.version)).all()
    again = run(session, path)
    assert (again.added, again.already) == (0, 3)
    assert session.scalar(select(func.count()).select_from(Event)) == events
    assert session.execute(select(Subscriber.email, Subscriber.version)).all() == versions


def test_it_never_resubscribes_nor_overrides_a_recorded_choice(session, tmp_path):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, None, Origin("page"), reason="complained")
    summary = run(session, write(tmp_path, "ann@example.com\nnew@example.com\n"))
    assert (summary.added, summary.already) == (1, 1)
    session.expire_all()
    assert state(session, "ann@example.com").left_all_reason == "complained"
    assert session.scalar(select(func.count()).select_from(Preference).where(Preference.subscribed)) == 0


def test_known_and_new_addresses_in_one_batch_each_leave_once(session, tmp_path):
    # PostgreSQL writes the new subscribers already out; the known ones are updated
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", Origin("page"))
    summary = run(session, write(tmp_path, "ann@example.com\nnew@example.com\n"))
    assert (summary.added, summary.already) == (2, 0)
    session.expire_all()
    known, new = state(session, "ann@example.com"), state(session, "new@example.com")
    assert (known.left_all_reason, known.version, known.left_all_version) == ("imported", 2, 2)
    assert (new.left_all_reason, new.version, new.left_all_version) == ("imported", 1, 1)
    for person in (known, new):
        imported = (
            select(func.count())
            .select_from(Event)
            .where(Event.subscriber_id == person.id, Event.source == "import")
        )
        assert session.scalar(imported) == 1
    assert ledger.verdict_for(session, "new@example.com", "news").reason == "unsubscribed_all"


def test_erased_addresses_are_skipped_not_resurrected(session, tmp_path):
    make_subscriber(session, "ann@example.com")
    subjects.erase_subject(session, "ann@example.com")
    summary = run(session, write(tmp_path, "ann@example.com\nbob@example.com\n"))
    assert (summary.added, summary.erased, summary.already) == (1, 1, 0)
    assert state(session, "ann@example.com") is None


def test_dry_run_counts_and_changes_nothing(session, tmp_path):
    summary = run(session, write(tmp_path, POSTMARK), dry_run=True)
    assert (summary.dry_run, summary.added) == (True, 3)
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 0
    assert session.scalar(select(func.count()).select_from(Event)) == 0


def test_a_topic_import_opts_out_of_that_topic_only(session, tmp_path):
    make_topic(session, "news")
    make_topic(session, "events")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_resubscribe(session, ann.public_id, "news", Origin("preferences"))
    path = write(tmp_path, SENDGRID)
    summary = run(session, path, topic_key="news")
    assert summary.added == 2
    ann = state(session, "ann@example.com")
    assert ann.left_all_reason is None and ann.version == 2
    preference = session.scalar(select(Preference).where(Preference.subscriber_id == ann.id))
    assert (preference.subscribed, preference.version, preference.source) == (False, 2, "import")
    assert ledger.verdict_for(session, "ann@example.com", "news").reason == "unsubscribed"
    assert ledger.verdict_for(session, "ann@example.com", "events").allowed
    assert run(session, path, topic_key="news").added == 0


def test_duplicates_in_one_file_keep_the_strongest_reason(session, tmp_path):
    text = "EmailAddress,SuppressionReason,Origin,CreatedAt\n"
    text += "ann@example.com,ManualSuppression,Customer,2020-01-02T00:00:00Z\n"
    text += "ANN@example.com,SpamComplaint,Recipient,2020-01-01T00:00:00Z\n"
    summary = run(session, write(tmp_path, text))
    assert (summary.read, summary.added, summary.already) == (2, 1, 0)
    ann = state(session, "ann@example.com")
    assert ann.left_all_reason == "complained" and ann.left_all_at == datetime(2020, 1, 1, tzinfo=UTC)


def test_batches_are_independent_of_their_size(session, tmp_path):
    lines = "".join(f"user{i}@example.com\n" for i in range(23))
    summary = run(session, write(tmp_path, lines), batch_size=5)
    assert (summary.read, summary.added) == (23, 23)
    assert session.scalar(select(func.count()).select_from(Event)) == 23


def test_times_are_read_as_the_services_write_them():
    assert parse_time("1700000000") == datetime.fromtimestamp(1700000000, UTC)
    assert parse_time("2023-01-15 10:20:30") == datetime(2023, 1, 15, 10, 20, 30, tzinfo=UTC)
    assert parse_time("2023-01-15T10:20:30Z") == datetime(2023, 1, 15, 10, 20, 30, tzinfo=UTC)
    assert parse_time("Fri, 21 Oct 2011 11:02:55 UTC") == datetime(2011, 10, 21, 11, 2, 55, tzinfo=UTC)
    assert parse_time("yesterday") is None and parse_time("") is None


def test_the_bulk_fingerprint_is_the_ledgers():
    key = b"k" * 32
    assert address_fingerprinter(key)("ann@example.com") == address_fingerprint(key, "ann@example.com")


def test_the_command_prints_a_summary(runner, session, tmp_path):
    path = write(tmp_path, SENDGRID)
    dry = runner.invoke(args=["import", str(path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would add 2" in dry.output
    result = runner.invoke(args=["import", str(path), "--format", "sendgrid"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == ("sendgrid: read 3, added 2, already suppressed 0, erased (skipped) 0, invalid 1")
    assert lines[1] == "invalid addresses on lines 4"
    assert "read 3, added 0, already suppressed 2" in runner.invoke(args=["import", str(path)]).output


def test_the_command_reports_errors_in_one_line(runner, session, tmp_path):
    path = write(tmp_path, SENDGRID)
    for args in (["--topic", "missing"], ["--format", "postmark"]):
        result = runner.invoke(args=["import", str(path), *args])
        assert result.exit_code != 0
        assert result.output.strip().startswith("Error:") and len(result.output.strip().splitlines()) == 1


MILLION = 1_000_000
CHILD = textwrap.dedent(
    """
    import sys
    from prefs import create_app
    from prefs.domain import imports
    from prefs.extensions import db
    app = create_app({"TESTING": True, "DATABASE_URL": sys.argv[1], "SECRET_KEYS": ["k" * 20]})
    with app.app_context():
        db.create_all()
        with open(sys.argv[2], newline="") as f:
            summary = imports.import_file(db.session(), f)
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    print(summary.read, summary.added, peak)
    """
)


def measure(tmp_path, rows):
    """Import ``rows`` addresses in a fresh process; return its summary and peak RSS (KiB)."""
    path = tmp_path / f"{rows}.csv"
    with path.open("w") as f:
        f.write("email,created\n")
        for i in range(rows):
            f.write(f"user{i}@example{i % 1000}.com,{1600000000 + i}\n")
    url = f"sqlite:///{tmp_path / f'{rows}.sqlite3'}"
    env = {**os.environ, "PREFS_INSTANCE_PATH": str(tmp_path / "instance")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(path)], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    return int(out[0]), int(out[1]), int(out[2])


@pytest.mark.slow
def test_a_million_rows_stream_in_bounded_memory(tmp_path):
    # its speed (20,000 rows/s) is the benchmark harness's import figure, not a timed test
    _, _, small_peak = measure(tmp_path, 10_000)
    read, added, peak = measure(tmp_path, MILLION)
    assert (read, added) == (MILLION, MILLION)
    growth_mib = (peak - small_peak) / 1024
    # streaming: a hundred times the rows costs no more than SQLite's page cache and a batch
    assert growth_mib < imports.SQLITE_CACHE_KIB / 1024 + 30


def test_imported_times_are_stored_as_the_orm_stores_them(session, tmp_path):
    # SQLite compares times as text: an import must write the very format the ORM writes
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, None, Origin("page"))
    run(session, write(tmp_path, SENDGRID))
    raw = session.execute(text("SELECT created_at FROM events ORDER BY id")).scalars().all()
    orm_written, imported = raw[0], raw[1]
    # text on SQLite, timestamptz values on PostgreSQL
    assert type(orm_written) is type(imported)
    if isinstance(imported, str):
        assert len(orm_written) == len(imported)
    assert (
        session.scalar(select(func.count()).select_from(Event).where(Event.created_at < datetime.now(UTC)))
        == 2
    )


# encodings: a file is imported as written, or refused in one line before any row is


def left(session, email):
    """Tell whether an address is out of all marketing."""
    return ledger.verdict_for(session, email, "news").allowed is False


SPREADSHEET = "email,created\r\nann@example.com,1700000000\r\nbüro@example.com,1700000100\r\n"


@pytest.mark.parametrize(
    "data",
    [
        SPREADSHEET.encode("utf-16"),
        SPREADSHEET.encode("utf-16-le"),
        SPREADSHEET.encode("utf-16-be"),
        SPREADSHEET.encode("utf-32"),
        SPREADSHEET.encode("utf-8-sig"),
        SPREADSHEET.replace("\r\n", "\n", 1).replace("com,1700000100\r\n", "com,1700000100\r").encode(),
        "ann@example.com\r\nbüro@example.com\r\n".encode("utf-16"),
    ],
    ids=["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-bom", "mixed-line-endings", "plain-utf-16"],
)
def test_the_command_imports_a_file_in_a_unicode_encoding(runner, session, tmp_path, data):
    make_topic(session, "news")
    path = tmp_path / "list.csv"
    path.write_bytes(data)
    result = runner.invoke(args=["import", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "added 2" in result.output and "invalid 0" in result.output, result.output
    assert left(session, "ann@example.com") and left(session, "büro@example.com")


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_a_file_not_in_utf_8_is_refused_in_one_line_before_any_row_or_read_as_named(
    runner, session, tmp_path, encoding
):
    make_topic(session, "news")
    rows = "".join(f"user{i}@example.com,1700000000\n" for i in range(2500))
    path = tmp_path / "list.csv"
    path.write_bytes(("email,created\n" + rows + "büro@example.com,1700000100\n").encode(encoding))
    result = runner.invoke(args=["import", str(path)])
    assert result.exit_code != 0
    output = result.output.strip()
    assert output.startswith("Error:") and len(output.splitlines()) == 1, output
    assert "UTF-8" in output and "line 2502" in output and "--encoding" in output, output
    # nothing was imported: not the rows before the bad byte either
    assert not left(session, "user0@example.com")
    named = runner.invoke(args=["import", str(path), "--encoding", encoding])
    assert named.exit_code == 0, (named.output, named.exception)
    assert left(session, "user0@example.com") and left(session, "büro@example.com")


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 4,
        b"email,created\nann@example.com,1\n\xff\xfe\x00",
        "email\n".encode("utf-16")[:-1],
    ],
    ids=["binary", "a stray byte at the end", "utf-16 cut in a character"],
)
def test_a_file_that_is_not_text_is_refused_in_one_line(runner, session, tmp_path, data):
    path = tmp_path / "list.csv"
    path.write_bytes(data)
    result = runner.invoke(args=["import", str(path)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    output = result.output.strip()
    assert output.startswith("Error:") and len(output.splitlines()) == 1, output


def test_nul_bytes_make_a_line_invalid_and_never_reach_the_database(runner, session, tmp_path):
    make_topic(session, "news")
    path = tmp_path / "list.csv"
    header = MAILCHIMP_UNSUBSCRIBED.splitlines()[0]
    row = MAILCHIMP_UNSUBSCRIBED.splitlines()[1].replace("a1b2c3d4e5", "a1b2\x00c3d4")
    bad = "b\x00ob@example.com" + row[len("ann@example.com") :]
    path.write_text(f"{header}\n{row}\n{bad}\n\x00\x00\n", encoding="utf-8")
    result = runner.invoke(args=["import", str(path)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "added 1" in result.output and "invalid addresses on lines 3" in result.output, result.output
    assert left(session, "ann@example.com")
    campaigns = session.scalars(select(Event.campaign)).all()
    assert all("\x00" not in (c or "") for c in campaigns), campaigns


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"email,created\nann@example.com,1\n" + b"x" * 200_000 + b",1\nbob@example.com,2\n", "line 3"),
        (
            b'email,created\nann@example.com,1\n"bob@example.com,2\n' + b"carl@example.com,3\n" * 10_000,
            "line 3",
        ),
        (b'email,created\nann@example.com,1\n"bob@example.com,2\n' + b"carl@example.com,3\n" * 10, "line 3"),
        (b'ann@example.com\n"bob@example.com\ncarl@example.com\n', "line 2"),
    ],
    ids=["a cell over the limit", "an open quote to the end", "an open quote swallowing lines", "plain"],
)
def test_a_file_whose_quoting_is_broken_is_refused_in_one_line_naming_where(
    runner, session, tmp_path, data, line
):
    path = tmp_path / "list.csv"
    path.write_bytes(data)
    result = runner.invoke(args=["import", str(path)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    output = result.output.strip()
    assert output.startswith("Error:") and len(output.splitlines()) == 1, output
    assert line in output, output


@pytest.mark.parametrize(
    "encoding", ["rot13", "base64", "zlib", "hex", "no-such-encoding", "idna", "undefined"]
)
def test_an_encoding_that_is_not_a_text_encoding_is_refused_in_one_line(runner, session, tmp_path, encoding):
    path = write(tmp_path, SENDGRID)
    result = runner.invoke(args=["import", str(path), "--encoding", encoding])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    output = result.output.strip()
    assert output.startswith("Error:") and len(output.splitlines()) == 1 and encoding in output, output
