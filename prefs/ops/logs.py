"""JSON log lines on stdout, scrubbed of addresses, link tokens and API keys."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

# the fields a record may carry besides its message; nothing else is written
FIELDS = (
    "request_id",
    "method",
    "route",
    "status",
    "duration_ms",
    "action",
    "topic",
    "source",
    "reason",
    "campaign",
    "count",
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
# last line of defence: whatever a message says, addresses, link tokens and keys are masked.
# Every pattern takes linear time on any text (tests/test_logs.py holds them to 64 KB of
# adversarial text): none may scan a stretch again from each of its positions.
_SEP = r" \t\n\r\f\v/?&=\"'<>(),;:"
# before an @, / ? & = and ' are letters of a local part (RFC 5322's atext: a/b@, o'brien@,
# mary=jo@), so a stretch there ends only at what no unquoted local part holds
_SEP_LEFT = r" \t\n\r\f\v\"<>(),;:"
# an @ as an address may be written in a log: plain, percent-encoded once or more (%40,
# %2540), a look-alike (U+FF20, U+FE6B) raw or percent-encoded as UTF-8, an HTML entity,
# an escape (\u0040, \x40, %u0040) or spelt (at) / [at]; spaced out or broken after
# an HTML entity's &, # and ; may themselves be percent-encoded
_AMP, _HASH, _SEMI = r"(?:&|%(?:25)*26)", r"(?:#|%(?:25)*23)", r"(?:;|%(?:25)*3[bB])"
_AT_SIGN = (
    r"@|\uff20|\ufe6b"
    r"|%(?:25)*(?:40|[eE][fF]%(?:25)*(?:[bB][cC]%(?:25)*[aA]0|[bB]9%(?:25)*[aA][bB]))"
    rf"|{_AMP}(?:{_HASH}0{{0,4}}64|{_HASH}[xX]0{{0,4}}40|commat){_SEMI}?|[\\%][uU]0040|\\[xX]40"
    r"|\([aA][tT]\)|\[[aA][tT]\]|\{[aA][tT]\}"
)
_AT = rf"(?:[ \t]{{0,3}}(?:{_AT_SIGN})[ \t\r\n]{{0,3}})"
# a text with no @ in any form is left as it is, after one scan
_AT_START = re.compile(_AT_SIGN)
# a stretch between separators that holds an @ (either side may be empty: a message cut
# short can split an address in two), or a quoted local part before one. The look-behind
# starts a match only where a stretch starts, so a stretch with no @ is scanned once, not
# once from each of its characters; a quoted part is at most 64 characters.
_EMAIL = re.compile(rf'(?:"[^"\r\n]{{0,64}}"|(?<![^{_SEP_LEFT}])[^{_SEP_LEFT}]*?){_AT}[^{_SEP}]*')
# a link's token after /u/ or /p/, slashes plain or percent-encoded
_TOKEN_PATH = re.compile(r"((?:/|%(?:25)*2[fF])[upUP](?:/|%(?:25)*2[fF]))[^\s/?\"']+")
# a token anywhere else: its signature, 27 characters of base64 after a dot, ends it
_SIGNATURE = re.compile(r"\.[A-Za-z0-9_-]{27}(?![A-Za-z0-9_-])")
_API_KEY = re.compile(r"prefs_[A-Za-z0-9_-]{8,}")
_MARK = "_prefs_json_handler"


def scrub(text: str) -> str:
    """Mask every address, link token and API key in a text, in time linear in its length."""
    text = _API_KEY.sub("prefs_[key]", text)
    text = _TOKEN_PATH.sub(r"\1[token]", text)
    text = _SIGNATURE.sub(".[signature]", text)
    if _AT_START.search(text) is None:
        return text
    return _EMAIL.sub("[email]", text)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object on one line, scrubbed of personal data."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(entry, separators=(",", ":"))


class NoResultRows(logging.Filter):
    """Drop SQLAlchemy's debug lines: they hold result rows, which are data, not log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or not record.name.startswith("sqlalchemy.")


class Scrubbed(logging.Filter):
    """Mask addresses, tokens and keys in a logger's records, whichever handler writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), None
        return True


class UnkeyedLimits(logging.Filter):
    """Make Flask-Limiter's swallowed database error one warning line, not an error and a traceback.

    The limits' keys are keyed hashes under a key kept in the database: while it does not
    answer, every limited request would log a traceback of a few kilobytes. The request goes
    on (unlimited, as on a storage outage) and meets the outage itself, which is logged there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, SQLAlchemyError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = "rate limits not applied: the database did not answer (%s)"
            record.args = (type(error).__name__,)
            record.exc_info = record.exc_text = None
        return True


# werkzeug's development server (``flask --app prefs demo``) logs each request line, path
# and all: mask it at the logger, before any handler (its own, alembic's) writes it
SCRUBBED_LOGGERS = ("werkzeug",)


def configure(level: str = "INFO") -> None:
    """Send every log record to stdout as JSON; calling it again replaces the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    # sys.stdout as it is now: a test runner or a daemonizer may have swapped it
    handler = logging.StreamHandler(sys.stdout)
    setattr(handler, _MARK, True)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(NoResultRows())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in SCRUBBED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Scrubbed) for f in logger.filters):
            logger.addFilter(Scrubbed())
    limiter = logging.getLogger("flask-limiter")
    if not any(isinstance(f, UnkeyedLimits) for f in limiter.filters):
        limiter.addFilter(UnkeyedLimits())


def request_id(header: str | None) -> str:
    """Return the caller's request id when it is sane, else a new one."""
    if header and _REQUEST_ID.match(header):
        return header
    return os.urandom(16).hex()  # as random as uuid4().hex, a fifth of its cost
