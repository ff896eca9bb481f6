"""The one verdict: may this category be sent to this address, and if not, why.

Every surface (pages, API, CLI) asks ``verdict``; nothing re-implements a part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

TRANSACTIONAL = "transactional"

# why an address left all marketing, as recorded
LEFT_ALL_REASONS = ("unsubscribed", "complained", "bounced", "imported", "support")
# the verdict's reason for each: only complaints and bounces are told apart
_LEFT_ALL_VERDICT = {
    "unsubscribed": "unsubscribed_all",
    "imported": "unsubscribed_all",
    "support": "unsubscribed_all",
    "complained": "complained",
    "bounced": "bounced",
}
REASONS = (
    "unsubscribed",
    "unsubscribed_all",
    "complained",
    "bounced",
    "not_subscribed",
    "erased",
    "invalid_address",
)


@dataclass(frozen=True, slots=True)
class Category:
    """What is being sent: the transactional category, or a marketing topic."""

    key: str
    opt_in: bool = False

    @property
    def transactional(self) -> bool:
        return self.key == TRANSACTIONAL


TRANSACTIONAL_CATEGORY = Category(TRANSACTIONAL)


class State(NamedTuple):
    """What is recorded for one address and one topic; the default is a stranger's.

    A named tuple, not a dataclass: the check makes one per known recipient, thousands a
    request, and a tuple is made several times faster.
    """

    erased: bool = False
    left_all_reason: str | None = None
    left_all_version: int | None = None
    subscribed: bool | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the category may be sent, and if not, the reason."""

    allowed: bool
    reason: str | None = None


ALLOWED = Verdict(True)
STRANGER = State()
_SUPPRESSED = {reason: Verdict(False, reason) for reason in REASONS}


def verdict(state: State, category: Category) -> Verdict:
    """Decide whether ``category`` may be sent to the address whose state is ``state``."""
    # the privacy policy's promise: nothing recorded ever blocks transactional mail
    if category.key == TRANSACTIONAL:
        return ALLOWED
    if state.erased:
        return _SUPPRESSED["erased"]
    if state.left_all_reason is not None and (
        state.version is None or state.version <= (state.left_all_version or 0)
    ):
        # no explicit choice for this topic since leaving all marketing
        return _SUPPRESSED[reason_for_leaving_all(state.left_all_reason)]
    if state.subscribed is not None:
        return ALLOWED if state.subscribed else _SUPPRESSED["unsubscribed"]
    return _SUPPRESSED["not_subscribed"] if category.opt_in else ALLOWED


def reason_for_leaving_all(recorded: str) -> str:
    """Return the verdict's reason for someone who left all marketing for ``recorded``."""
    return _LEFT_ALL_VERDICT.get(recorded, "unsubscribed_all")


def suppression(reason: str) -> Verdict:
    """Return the negative verdict for a reason decided before any state is read."""
    return _SUPPRESSED[reason]
