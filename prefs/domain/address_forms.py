"""Find every written form of one address in a text, to mask it: ``scrub``.

A note says an address as a person or a program wrote it: in any case, percent-encoded
(once or more), as HTML entities, quoted-printable or escaped, quoted, with a ``+tag`` or
without the one on file, with the domain in Unicode or punycode, cut by a line break,
spaced out, or spelt ``ann [at] example [dot] com``. The text is decoded into a stream of
characters that each remember the stretch of the original they came from; the address is
matched in the stream, and the stretches it covers are masked in the original.
"""

from __future__ import annotations

import contextlib
import html
import re
import unicodedata
from collections.abc import Iterator
from typing import NamedTuple

from .addresses import DOTS_IGNORED, mask

# runs of escapes, each decoded as UTF-8 bytes: %40, =40 (quoted-printable), \x40
_BYTE_RUNS = re.compile(r"(?:%[0-9A-Fa-f]{2})+|(?:=[0-9A-Fa-f]{2})+|(?:\\x[0-9A-Fa-f]{2})+")
_OTHER = re.compile(
    r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});?"  # HTML entities
    r"|\\u[0-9A-Fa-f]{4}"  # JSON and Python escapes
    r"|[\[({<]\s*(?:at|dot)\s*[\])}>]",  # ann [at] example [dot] com
    re.IGNORECASE,
)
_SPELT = {"at": "@", "dot": "."}
# decoded again while something changes: %2540 is %40 once decoded, &amp;#64; is &#64;
_PASSES = 4
# what is not there when read: spaces, line breaks, zero-width characters, soft hyphens
_INVISIBLE = frozenset("\u00ad\u200b\u200c\u200d\u2060\ufeff")
_DOTS = {"\u3002": ".", "\uff0e": ".", "\uff61": "."}
_IN_A_NAME = frozenset("._-")


class _Char(NamedTuple):
    text: str
    start: int
    end: int


def _decoded_once(chars: list[_Char]) -> tuple[list[_Char], bool]:
    joined = "".join(c.text for c in chars)
    spans: list[tuple[int, int, str]] = []
    for found in _BYTE_RUNS.finditer(joined):
        run = found.group()
        step = 4 if run.startswith("\\") else 3
        data = bytes(int(run[i + step - 2 : i + step], 16) for i in range(0, len(run), step))
        spans.append((found.start(), found.end(), data.decode("utf-8", "replace")))
    for found in _OTHER.finditer(joined):
        token = found.group()
        if token.startswith("\\"):
            decoded = chr(int(token[2:], 16))
        elif token.startswith("&"):
            decoded = html.unescape(token)
        else:
            decoded = _SPELT[token.strip("[](){}<> \t\r\n").lower()]
        if decoded != token:
            spans.append((found.start(), found.end(), decoded))
    if not spans:
        return chars, False
    spans.sort()
    result: list[_Char] = []
    at = 0
    for start, end, decoded in spans:
        if start < at:  # overlapping decodings (an entity inside a run): the first wins
            continue
        result.extend(chars[at:start])
        first, last = chars[start].start, chars[end - 1].end
        result.extend(_Char(c, first, last) for c in decoded)
        at = end
    result.extend(chars[at:])
    return result, True


def _stream(text: str) -> list[_Char]:
    """Return the text decoded, folded and without what is invisible, each character with its stretch."""
    chars = [_Char(c, i, i + 1) for i, c in enumerate(text)]
    for _ in range(_PASSES):
        chars, changed = _decoded_once(chars)
        if not changed:
            break
    folded: list[_Char] = []
    for char in _composed(chars):
        if char.text.isspace() or char.text in _INVISIBLE:
            continue
        for c in unicodedata.normalize("NFKC", _DOTS.get(char.text, char.text)).casefold():
            folded.append(_Char(_DOTS.get(c, c), char.start, char.end))
    return folded


def _composed(chars: list[_Char]) -> list[_Char]:
    """Compose a mark decoded on its own (``u&#x308;``) with the letter before it, as NFC would."""
    result: list[_Char] = []
    for char in chars:
        if result and len(char.text) == 1 and unicodedata.combining(char.text):
            before = result[-1]
            joined = unicodedata.normalize("NFC", before.text + char.text)
            if len(joined) == 1:
                result[-1] = _Char(joined, before.start, char.end)
                continue
        result.append(char)
    return result


def _labels(domain: str) -> list[str]:
    """Return a pattern for each label of a stored domain: its ASCII or its Unicode form."""
    patterns = []
    for label in domain.split("."):
        forms = {label}
        with contextlib.suppress(UnicodeError):
            forms.add(unicodedata.normalize("NFKC", label.encode("ascii").decode("idna")).casefold())
        patterns.append("(?:" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)) + ")")
    return patterns


# the domains whose mailboxes ignore the dots in a local part, each written as any of them
_DOTS_IGNORED = tuple(DOTS_IGNORED)


def _pattern(address: str) -> re.Pattern[str]:
    local, _, domain = address.rpartition("@")
    base = local.split("+", 1)[0] or local
    dots_ignored = domain in _DOTS_IGNORED
    if dots_ignored:
        base = base.replace(".", "") or base
    folded = unicodedata.normalize("NFKC", base).casefold()
    optional_dot = r"\.?" if dots_ignored else ""
    local_pattern = "".join(r"\\?" + re.escape(c) + optional_dot for c in folded)
    domains = [_DOTS_IGNORED] if dots_ignored else [(domain,)]
    domain_pattern = "|".join(r"(?:\.|dot)".join(_labels(d)) for d in domains[0])
    comment = r"(?:\([^()]{0,64}\))?"
    return re.compile(
        rf'"?{local_pattern}(?:\+[^@"<>,;()\[\]]{{0,64}}?)?"?{comment}(?:@|at){comment}(?:{domain_pattern})'
    )


def _spans(text: str, address: str) -> Iterator[tuple[int, int]]:
    chars = _stream(text)
    joined = "".join(c.text for c in chars)
    for found in _pattern(address).finditer(joined):
        start, end = found.start(), found.end()
        if start > 0 and _together(chars[start - 1], chars[start], text):
            before = chars[start - 1].text
            if before.isalnum() or before in _IN_A_NAME:
                continue  # part of a longer local part: another address
        if end < len(chars) and _together(chars[end - 1], chars[end], text):
            after = chars[end].text
            longer = end + 1 < len(chars) and chars[end + 1].text.isalnum()
            if after.isalnum() or after == "-" or (after == "." and longer):
                continue  # part of a longer domain: another address
        yield chars[start].start, chars[end - 1].end


def _together(before: _Char, after: _Char, text: str) -> bool:
    """Tell whether two stream characters were written with nothing invisible between them."""
    return not any(c.isspace() or c in _INVISIBLE for c in text[before.end : after.start])


def scrub(text: str, address: str) -> str:
    """Return ``text`` with every written form of a normalized address replaced by its mask."""
    text = unicodedata.normalize("NFC", text)
    spans = sorted(_spans(text, address))
    if not spans:
        return text
    out, at = [], 0
    for start, end in spans:
        if start < at:
            start = at
        if end <= start:
            continue
        out.append(text[at:start])
        out.append(mask(address))
        at = end
    out.append(text[at:])
    return "".join(out)
