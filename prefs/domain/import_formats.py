"""Read the suppression lists other services export, row by row, in their own column layouts.

Each reader yields ``Row``s: the line number, the address as written, the reason
(``imported``, ``complained`` or ``bounced``), the time the other service recorded,
and a campaign id where the file has one.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, TextIO

from ..errors import InvalidValue

FORMATS = ("sendgrid", "mailchimp", "postmark", "mailgun", "plain")
IMPORTED, COMPLAINED, BOUNCED = "imported", "complained", "bounced"
# when a file lists an address twice, the stronger reason wins
# Postmark's SuppressionReason values
POSTMARK_REASONS = {"hardbounce": BOUNCED, "spamcomplaint": COMPLAINED, "manualsuppression": IMPORTED}
# Mailchimp's unsubscribe reasons that are really spam reports
_MAILCHIMP_COMPLAINT = ("spam", "abuse")
MAX_CAMPAIGN = 64


class Row(NamedTuple):
    """One address read from a file (a tuple: a million of them are made per million rows)."""

    line: int
    email: str
    reason: str
    at: datetime | None
    campaign: str | None = None


def parse_time(text: str | None) -> datetime | None:
    """Read a time as the services write it (ISO 8601, Unix seconds, RFC 2822); None if unreadable."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        if text.replace(".", "", 1).isdigit():
            return datetime.fromtimestamp(float(text), UTC)
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        try:
            value = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _columns(header: list[str]) -> dict[str, int]:
    return {name.strip().lstrip("\ufeff").strip('"').lower(): i for i, name in enumerate(header)}


def detect(first_line: list[str]) -> str:
    """Tell the format from a file's first row, or raise ``InvalidValue``."""
    cols = _columns(first_line)
    if "emailaddress" in cols and "suppressionreason" in cols:
        return "postmark"
    if "email address" in cols:
        return "mailchimp"
    if "email" in cols and "created" in cols:
        return "sendgrid"
    if "address" in cols and "created_at" in cols:
        return "mailgun"
    if len(first_line) == 1 and "@" in first_line[0]:
        return "plain"
    shown = ", ".join(first_line[:6])[:120]
    raise InvalidValue(f"cannot tell the format from the first line ({shown}); name it with --format")


def _cell(row: list[str], index: int | None) -> str:
    try:
        return row[index].strip()  # type: ignore[index]
    except (IndexError, TypeError):
        return ""


def _campaign(row: list[str], index: int | None) -> str | None:
    return _cell(row, index)[:MAX_CAMPAIGN] or None


def _require(cols: dict[str, int], fmt: str, *names: str) -> None:
    missing = [name for name in names if name not in cols]
    if missing:
        raise InvalidValue(f"this is not a {fmt} export: it has no column {', '.join(missing)}")


Reader = Callable[[list[str]], tuple[str, str, datetime | None, str | None]]


def _sendgrid(cols: dict[str, int]) -> Reader:
    _require(cols, "SendGrid", "email")
    email, created = cols["email"], cols.get("created")
    return lambda row: (_cell(row, email), IMPORTED, parse_time(_cell(row, created)), None)


def _mailchimp(cols: dict[str, int]) -> Reader:
    _require(cols, "Mailchimp", "email address")
    email = cols["email address"]
    if "clean_time" in cols:
        # cleaned members: addresses that bounced
        cleaned_at, cleaned_in = cols["clean_time"], cols.get("clean_campaign_id")

        def cleaned(row: list[str]) -> tuple[str, str, datetime | None, str | None]:
            return _cell(row, email), BOUNCED, parse_time(_cell(row, cleaned_at)), _campaign(row, cleaned_in)

        return cleaned
    unsub_at, unsub_in, why = cols.get("unsub_time"), cols.get("unsub_campaign_id"), cols.get("unsub_reason")

    def unsubscribed(row: list[str]) -> tuple[str, str, datetime | None, str | None]:
        text = _cell(row, why).lower()
        reason = COMPLAINED if any(word in text for word in _MAILCHIMP_COMPLAINT) else IMPORTED
        return _cell(row, email), reason, parse_time(_cell(row, unsub_at)), _campaign(row, unsub_in)

    return unsubscribed


def _postmark(cols: dict[str, int]) -> Reader:
    _require(cols, "Postmark", "emailaddress")
    email, why, created = cols["emailaddress"], cols.get("suppressionreason"), cols.get("createdat")

    def read(row: list[str]) -> tuple[str, str, datetime | None, str | None]:
        reason = POSTMARK_REASONS.get(_cell(row, why).lower(), IMPORTED)
        return _cell(row, email), reason, parse_time(_cell(row, created)), None

    return read


def _mailgun(cols: dict[str, int]) -> Reader:
    _require(cols, "Mailgun", "address")
    email, created = cols["address"], cols.get("created_at")
    # the same layout serves Mailgun's unsubscribes (tags), bounces (code, error) and complaints
    reason = BOUNCED if "code" in cols or "error" in cols else IMPORTED
    if "tags" not in cols and reason == IMPORTED and set(cols) == {"address", "created_at"}:
        reason = COMPLAINED
    return lambda row: (_cell(row, email), reason, parse_time(_cell(row, created)), None)


_READERS: dict[str, Callable[[dict[str, int]], Reader]] = {
    "sendgrid": _sendgrid,
    "mailchimp": _mailchimp,
    "postmark": _postmark,
    "mailgun": _mailgun,
}


def read_rows(stream: TextIO, fmt: str = "auto") -> tuple[str, Iterator[Row]]:
    """Return the file's format and an iterator over its rows, read lazily."""
    if fmt != "auto" and fmt not in FORMATS:
        raise InvalidValue(f"the format is auto or one of {', '.join(FORMATS)}, not {fmt!r}")
    reader = csv.reader(stream)
    first = next(reader, None)
    while first is not None and not any(cell.strip() for cell in first):
        first = next(reader, None)
    if first is None:
        return ("plain" if fmt == "auto" else fmt), iter(())
    if fmt == "auto":
        fmt = detect(first)
    if fmt == "plain":
        return fmt, _plain(first, reader)
    cols = _columns(first)
    return fmt, _table(reader, _READERS[fmt](cols))


def _plain(first: list[str], reader: Any) -> Iterator[Row]:
    line = reader.line_num
    if first and first[0].strip() and not first[0].lstrip().startswith("#"):
        yield Row(line, ",".join(first).strip(), IMPORTED, None)
    for record in reader:
        text = ",".join(record).strip()
        if text and not text.startswith("#"):
            yield Row(reader.line_num, text, IMPORTED, None)


def _table(reader: Any, read: Reader) -> Iterator[Row]:
    for record in reader:
        if not record or not any(record):
            continue
        email, reason, at, campaign = read(record)
        yield Row(reader.line_num, email, reason, at, campaign)
