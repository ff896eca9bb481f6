"""What a change to someone's preferences is: who, what, where it came from, and what it did."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from ..errors import InvalidValue

SOURCES = ("one-click", "page", "preferences", "mailto", "api", "import", "cli")
UNSUBSCRIBE = "unsubscribe"
RESUBSCRIBE = "resubscribe"
# a hard bounce lifted while a complaint still keeps the address out: who may receive what is
# unchanged, so the change feed does not list it
BOUNCE_LIFTED = "bounce-lifted"


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a change came from, for the audit event."""

    source: str
    campaign: str | None = None
    fingerprint: str | None = None
    at: datetime | None = None  # when it happened, if reported later (API events)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidValue(f"unknown source {self.source!r}")


@dataclass(frozen=True, slots=True)
class Change:
    """One change asked for in a batch: who, which topic (None for all), in or out."""

    public_id: str
    topic_key: str | None
    subscribe: bool
    origin: Origin
    reason: str = "unsubscribed"


class Recorded(NamedTuple):
    """Whether a change was recorded, and what still keeps the address out after a re-subscription."""

    changed: bool
    kept_out: str | None = None  # the verdict's reason the source may not lift (rules.held_by)
    event: int | None = None  # the audit event's id, when one was recorded


UNCHANGED = Recorded(False)
CHANGED = Recorded(True)
