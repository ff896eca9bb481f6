"""Suppression files as spreadsheets and services write them: imported whole, or refused in one line."""

from __future__ import annotations

import re

import pytest

from prefs.domain import ledger
from tests.factories import make_topic
from tests.reliability.figures import report

pytestmark = pytest.mark.reliability

PEOPLE = ["ann@example.com", "büro@example.com", "o'brien@example.com", "zoe+news@example.org"]
TABLE = "email,created\r\n" + "".join(f"{p},1700000000\r\n" for p in PEOPLE)
PLAIN = "\n".join(PEOPLE) + "\n"
# (name, bytes, whether the file can be read as it is)
FILES = [
    ("utf-8", TABLE.encode(), True),
    ("utf-8 with BOM", TABLE.encode("utf-8-sig"), True),
    ("utf-16 with BOM", TABLE.encode("utf-16"), True),
    ("utf-16-le, no BOM", TABLE.encode("utf-16-le"), True),
    ("utf-16-be, no BOM", TABLE.encode("utf-16-be"), True),
    ("utf-32 with BOM", TABLE.encode("utf-32"), True),
    ("plain, utf-16", PLAIN.encode("utf-16"), True),
    ("mixed line endings", TABLE.replace("\r\n", "\n", 2).replace("\r\n", "\r", 1).encode(), True),
    ("no final line end", TABLE.rstrip("\r\n").encode(), True),
    ("latin-1", TABLE.encode("latin-1"), False),
    ("cp1252", TABLE.encode("cp1252"), False),
    ("utf-16 cut short", TABLE.encode("utf-16")[:-1], False),
    ("binary", bytes(range(256)) * 8, False),
    ("a cell over the csv limit", TABLE.encode() + b"x" * 200_000 + b",1\r\n", False),
    ("a quote left open", TABLE.replace("zoe", '"zoe').encode() + b"more@example.com,1\r\n" * 20, False),
]


def test_import_files_in_odd_encodings_and_shapes(runner, session, tmp_path):
    make_topic(session, "news")
    handled, imported, lost, crashed, wrong = 0, 0, 0, 0, []
    for name, data, readable in FILES:
        path = tmp_path / "list.csv"
        path.write_bytes(data)
        result = runner.invoke(args=["import", str(path)])
        output = result.output.strip()
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            crashed += 1
            wrong.append((name, repr(result.exception)[:120]))
            continue
        if result.exit_code == 0:
            imported += 1
            # each file's summary: every address read, none invalid (earlier files put them in already)
            found = re.search(r"read (\d+), .* invalid (\d+)", output)
            taken = int(found.group(1)) - int(found.group(2)) if found else 0
            lost += len(PEOPLE) - taken
            ok = readable and taken == len(PEOPLE)
        else:
            ok = not readable and output.startswith("Error:") and len(output.splitlines()) == 1
        handled += ok
        if not ok:
            wrong.append((name, output[:160]))
        session.rollback()
    report(
        "import files: encodings, line ends, broken quoting",
        len(FILES),
        imported,
        lost,
        crashed,
        f"{len(FILES)} import files: {imported} imported whole, {handled - imported} refused in one line, "
        f"{lost} addresses lost, {crashed} tracebacks",
    )
    assert wrong == [] and lost == 0, wrong
    assert not [p for p in PEOPLE if ledger.verdict_for(session, p, "news").allowed]
