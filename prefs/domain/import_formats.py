"""Read the suppression lists other services export, row by row, in their own column layouts.

Each reader yields ``Row``s: the line number, the address as written, the reason
(``imported``, ``complained`` or ``bounced``), the time the other service recorded,
and a campaign id where the file has one.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import BinaryIO, NamedTuple, TextIO

from ..errors import InvalidValue
from .tokens import CAMPAIGN

FORMATS = ("sendgrid", "mailchimp", "postmark", "mailgun", "plain")
IMPORTED, COMPLAINED, BOUNCED = "imported", "complained", "bounced"
# when a file lists an address twice, the stronger reason wins
# Postmark's SuppressionReason values
POSTMARK_REASONS = {"hardbounce": BOUNCED, "spamcomplaint": COMPLAINED, "manualsuppression": IMPORTED}
# Mailchimp's unsubscribe reasons that are really spam reports
_MAILCHIMP_COMPLAINT = ("spam", "abuse")
# byte order marks, longest first: UTF-32's begins with UTF-16's
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_NOT_FILE_ENCODINGS = frozenset({"idna", "punycode", "undefined"})
_SNIFF = 1024
_CHUNK = 1 << 20


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
    # a campaign is what the API takes as one; anything else (a NUL, a space) is left out
    cell = _cell(row, index)
    return cell if CAMPAIGN.match(cell) else None


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
    reader = _Records(stream)
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


class _Records:
    """The csv module's records, with a quoting error named by the line its record began on."""

    def __init__(self, stream: TextIO) -> None:
        self.reader = csv.reader(stream)
        self.line_num = 0
        self.began = 1

    def __iter__(self) -> _Records:
        return self

    def __next__(self) -> list[str]:
        self.began = self.line_num + 1
        try:
            record = next(self.reader)
        except csv.Error as err:
            raise InvalidValue(self.broken(str(err))) from None
        self.line_num = self.reader.line_num
        return record

    def broken(self, what: str) -> str:
        return (
            f"line {self.began}: {what}; is a quote left open? Fix the file and import it again "
            "(rows before it may be in already; a second import adds only what is missing)"
        )

    def check_address(self, address: str) -> str:
        """Refuse an address cell that runs on over lines: a quote left open swallowed them."""
        if "\n" in address or "\r" in address:
            raise InvalidValue(self.broken(f"an address runs on to line {self.line_num}"))
        return address


def _plain(first: list[str], reader: _Records) -> Iterator[Row]:
    line = reader.line_num
    if first and first[0].strip() and not first[0].lstrip().startswith("#"):
        yield Row(line, reader.check_address(",".join(first).strip()), IMPORTED, None)
    for record in reader:
        text = ",".join(record).strip()
        if text and not text.startswith("#"):
            yield Row(reader.line_num, reader.check_address(text), IMPORTED, None)


def _table(reader: _Records, read: Reader) -> Iterator[Row]:
    for record in reader:
        if not record or not any(record):
            continue
        email, reason, at, campaign = read(record)
        yield Row(reader.line_num, reader.check_address(email), reason, at, campaign)


def open_text(binary: BinaryIO, encoding: str | None = None) -> io.TextIOWrapper:
    """Return a file of bytes as text, in the encoding named or the one it shows, checked first.

    Without a name: the encoding its byte order mark names, UTF-16 where every other byte of
    its start is NUL, else UTF-8. A file that can be read again is decoded through before any
    row is read, so one that is not in that encoding is refused, naming the line, before a
    row of it is imported.
    """
    head = _head(binary)
    if encoding is not None:
        try:
            info = codecs.lookup(encoding)
        except LookupError:
            raise InvalidValue(f"unknown encoding {encoding!r}") from None
        # rot13, base64, zlib...: codecs, but not of text; idna and punycode: of host names
        if not getattr(info, "_is_text_encoding", True) or info.name in _NOT_FILE_ENCODINGS:
            raise InvalidValue(f"{encoding!r} is not an encoding text files are written in")
        encoding = info.name
    else:
        encoding = _sniff(head)
    if binary.seekable():
        start = binary.tell()
        _check(binary, encoding)
        binary.seek(start)
    # newline="": the csv module reads \r\n, \n and \r line ends itself, also inside quotes
    return io.TextIOWrapper(binary, encoding=encoding, newline="")


def _head(binary: BinaryIO) -> bytes:
    peek = getattr(binary, "peek", None)
    if peek is not None:
        return bytes(peek(_SNIFF)[:_SNIFF])
    if binary.seekable():
        start = binary.tell()
        head = binary.read(_SNIFF)
        binary.seek(start)
        return head
    return b""


def _sniff(head: bytes) -> str:
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    pairs = len(head) // 2
    if pairs:
        even, odd = head[0 : 2 * pairs : 2], head[1 : 2 * pairs : 2]
        if odd.count(0) == pairs and even.count(0) == 0:
            return "utf-16-le"
        if even.count(0) == pairs and odd.count(0) == 0:
            return "utf-16-be"
    return "utf-8"


def _check(binary: BinaryIO, encoding: str) -> None:
    decoder = codecs.getincrementaldecoder(encoding)()
    lines = 1
    while True:
        chunk = binary.read(_CHUNK)
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as err:
            raise InvalidValue(_not_in(encoding, lines, decoder, chunk, err)) from None
        lines += text.count("\n") + text.count("\r") - text.count("\r\n")
        if not chunk:
            return


def _not_in(
    encoding: str, lines: int, decoder: codecs.IncrementalDecoder, chunk: bytes, err: Exception
) -> str:
    """Say where a file stops being in an encoding, and what to do."""
    start = getattr(err, "start", 0)
    # the line of the bad byte: count the line ends of the chunk before it
    decoder.reset()
    before = chunk[:start].decode(encoding, "replace")
    lines += before.count("\n") + before.count("\r") - before.count("\r\n")
    found = f"byte 0x{chunk[start]:02X}" if start < len(chunk) else "its last bytes"
    name = "UTF-8" if encoding.startswith("utf-8") else encoding
    return (
        f"the file is not {name} (line {lines}, {found}): save it as UTF-8, "
        "or name its encoding with --encoding (latin-1, cp1252...)"
    )
