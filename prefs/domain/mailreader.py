"""Read a raw message within bounds: its header fields as sent, top first, and the few addresses needed.

Nothing here parses more than the decision needs: the header section is split with the
compat32 parser (no structured parsing, no encoded-word decoding), and only From and the
recipient fields are parsed as addresses, each after a check of its length and nesting.
A later reader of reports (ARF, DSN) walks the body's MIME parts within the same bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from ..errors import InvalidMessage, MessageTooLarge

MAX_MESSAGE = 1024 * 1024
MAX_HEADER_BYTES = 128 * 1024
# physical lines: a folded field is joined line by line, by us and by DKIM verifiers
MAX_HEADER_LINES = 2000
MAX_FIELDS = 500
# the fields parsed as addresses, and the Subject, are read only up to this length
MAX_PARSED_FIELD = 4096
MAX_ADDRESSES = 50
# comments nest in structured fields; parsers recurse on them
MAX_NESTING = 8

_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
# every line that a lenient reader could take for a From field, obsolete "From :" included
_FROM_LINE = re.compile(rb"^from[ \t]*:", re.IGNORECASE | re.MULTILINE)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Message:
    """A message's header fields (lower-case name, unfolded text) top first, its body, and itself."""

    fields: tuple[tuple[str, str], ...]
    body: bytes
    from_lines: int
    raw: bytes = field(repr=False)

    def values(self, name: str) -> list[str]:
        """Return the values of every field with this name, top first."""
        name = name.lower()
        return [value for field, value in self.fields if field == name]


def read(raw: bytes) -> Message:
    """Split a raw message into bounded header fields and a body, or raise ``InvalidMessage``."""
    if not raw:
        raise InvalidMessage("the message is empty")
    if len(raw) > MAX_MESSAGE:
        raise MessageTooLarge(f"the message is larger than {MAX_MESSAGE} bytes")
    end = _END_OF_HEADERS.search(raw, 0, MAX_HEADER_BYTES + 4)
    head, body = (raw[: end.start()], raw[end.end() :]) if end else (raw, b"")
    if len(head) > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"the header section is larger than {MAX_HEADER_BYTES} bytes")
    if max(head.count(b"\n"), head.count(b"\r")) > MAX_HEADER_LINES:
        raise MessageTooLarge(f"the header section has more than {MAX_HEADER_LINES} lines")
    if not _one_reading(head):
        raise InvalidMessage("the header section holds a bare CR, a bare LF or a NUL")
    parsed = BytesHeaderParser(policy=policy.compat32).parsebytes(head)
    fields = tuple((name.lower(), _text(value)) for name, value in parsed.raw_items())
    if len(fields) > MAX_FIELDS:
        raise MessageTooLarge(f"the message has more than {MAX_FIELDS} header fields")
    if not {name for name, _ in fields} & {"from", "to", "subject"}:
        raise InvalidMessage("the message has no From, To or Subject header")
    return Message(fields, body, len(_FROM_LINE.findall(head)), raw)


def _one_reading(head: bytes) -> bool:
    """Tell whether every reader splits the header section alike: lines end all in CRLF or all in LF.

    The stdlib ends a line at a bare CR or LF, dkimpy and MTAs only at CRLF (or LF), and a
    milter's C strings at a NUL: a field hidden behind one of them is seen by some readers only.
    """
    if b"\0" in head:
        return False
    crlf = head.count(b"\r\n")
    return head.count(b"\r") == crlf and (crlf == 0 or head.count(b"\n") == crlf)


def _text(value: str) -> str:
    """Unfold a raw field value and read its bytes as UTF-8 (RFC 6532), replacing what is not."""
    raw = _LINE_BREAK.sub("", value).encode("ascii", "surrogateescape")
    return raw.decode("utf-8", "replace").strip()


def addresses(message: Message, name: str) -> list[str]:
    """Return the addr-specs of every field with this name, or raise ``InvalidMessage`` past a bound."""
    values = message.values(name)
    text = ", ".join(values)
    check_bounds(text, name)
    if group_depth(text) > MAX_NESTING:
        raise InvalidMessage(f"the {name} header nests groups more than {MAX_NESTING} deep")
    found = [address for _, address in getaddresses(values) if address]
    if len(found) > MAX_ADDRESSES:
        raise InvalidMessage(f"the {name} header lists more than {MAX_ADDRESSES} addresses")
    return found


def subject(message: Message) -> str:
    """Return the Subject as text, encoded words decoded, or raise ``InvalidMessage`` past a bound."""
    text = " ".join(message.values("subject"))
    check_bounds(text, "subject")
    if "=?" not in text:
        return text
    try:
        return "".join(
            part.decode(charset or "ascii", "replace") if isinstance(part, bytes) else part
            for part, charset in decode_header(text)
        )
    except (LookupError, ValueError, HeaderParseError):
        return text


def check_bounds(text: str, name: str) -> None:
    """Raise ``InvalidMessage`` when a field to be parsed is too long or nests comments too deeply."""
    if len(text) > MAX_PARSED_FIELD:
        raise InvalidMessage(f"the {name} header is longer than {MAX_PARSED_FIELD} characters")
    if nesting(text) > MAX_NESTING:
        raise InvalidMessage(f"the {name} header nests comments more than {MAX_NESTING} deep")


def nesting(text: str) -> int:
    """Return how deep RFC 5322 comments nest in a field, quoted strings and escapes skipped."""
    depth = deepest = 0
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif char == '"' and depth == 0:
            quoted = True
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth:
            depth -= 1
    return deepest


def group_depth(text: str) -> int:
    """Return how deep RFC 5322 groups nest in an address field; the stdlib parser recurses on each."""
    depth = deepest = 0
    closer = ""  # the character that ends the quoted string, comment, angle or domain literal we are in
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif closer:
            closer = "" if char == closer else closer
        elif char in _OPENERS:
            closer = _OPENERS[char]
        elif char == ":":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ";" and depth:
            depth -= 1
    return deepest


# a colon inside these is no group; comments are bounded by ``nesting`` before this runs
_OPENERS = {'"': '"', "(": ")", "<": ">", "[": "]"}
