"""Opaque keyset cursors for the register's and the overview's pages: numbers, times and names."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import InvalidValue
from .text import storable

# times travel as microseconds since year 1, so every storable time is a whole number >= 0
_ORIGIN = datetime(1, 1, 1, tzinfo=UTC)
_INVALID = "the cursor is not one this service gave out"


def encode(*parts: int | str | datetime) -> str:
    """Return an opaque cursor for a keyset position (ints, strings and aware times)."""
    plain = [_micros(p) if isinstance(p, datetime) else p for p in parts]
    raw = json.dumps(plain, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, *kinds: type) -> tuple[Any, ...]:
    """Return the position of a cursor whose parts are of ``kinds``, or raise ``InvalidValue``."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidValue(_INVALID) from None
    if not isinstance(parts, list) or len(parts) != len(kinds):
        raise InvalidValue(_INVALID)
    return tuple(_part(part, kind) for part, kind in zip(parts, kinds, strict=True))


def _part(value: Any, kind: type) -> Any:
    if kind is str:
        # JSON may spell a NUL or a lone surrogate (\u0000, \ud800): neither names a stored row
        if isinstance(value, str) and 0 < len(value) <= 200 and storable(value):
            return value
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        if kind is int:
            return value
        try:
            return _ORIGIN + timedelta(microseconds=value)
        except OverflowError:
            pass
    raise InvalidValue(_INVALID)


def _micros(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - _ORIGIN
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
