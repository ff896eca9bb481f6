"""What text both databases can store: no NUL character (PostgreSQL), no lone surrogate (UTF-8)."""

from __future__ import annotations

from ..errors import InvalidValue

UNSTORABLE = "holds a NUL character or a lone surrogate, which cannot be stored"


def storable(value: str) -> bool:
    """Tell whether both databases can store ``value`` as text."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, from a JSON escape or a non-UTF-8 argument
        return False
    return True


def check_text(value: str, what: str) -> str:
    """Return ``value`` if both databases can store it, or raise ``InvalidValue`` naming ``what``."""
    if not storable(value):
        raise InvalidValue(f"the {what} {UNSTORABLE}")
    return value
