"""The one verdict: may this category be sent to this address, and if not, why.

Every surface (pages, API, CLI) asks ``verdict``; nothing re-implements a part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .changes import RESUBSCRIBE, UNSUBSCRIBE

TRANSACTIONAL = "transactional"

# why an address left all marketing, as recorded
LEFT_ALL_REASONS = ("unsubscribed", "complained", "bounced", "imported", "support")
# how strong a reason for leaving all marketing is: a stronger one replaces a weaker one, never
# the reverse; every reason not named ranks 1
RANK = {"complained": 3, "bounced": 2}
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


# Who may bring back someone who left all marketing for this reason; anyone, for the others.
# A complaint: only the person, topic by topic, in the preference center. A hard bounce: only
# a mailer (API) or an operator (CLI) who knows the address works again, never a page.
LIFTED_BY = {
    "complained": frozenset({"preferences"}),
    "bounced": frozenset({"api", "cli"}),
}


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
    source: str | None = None  # who made the topic's explicit choice
    bounced: bool = False  # a hard bounce is on file (a complaint outranks it as the reason)


class Lift(NamedTuple):
    """What a re-subscription to all marketing from one source lifts, and what still holds."""

    left: bool  # the reason for leaving all marketing
    bounce: bool  # the hard bounce on file
    kept_out: str | None  # the verdict's reason that still keeps the address out


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
    left = state.left_all_reason
    if left is not None and (
        # no explicit choice for this topic since leaving all marketing
        state.version is None
        or state.version <= (state.left_all_version or 0)
        # or a choice by someone who may not lift this reason
        or (state.subscribed and held_by(left, state.bounced, state.source) is not None)
    ):
        return _SUPPRESSED[reason_for_leaving_all(left)]
    if state.subscribed is not None:
        return ALLOWED if state.subscribed else _SUPPRESSED["unsubscribed"]
    return _SUPPRESSED["not_subscribed"] if category.opt_in else ALLOWED


def held_by(left_all_reason: str | None, bounced: bool, source: str | None) -> str | None:
    """Return what stops a later choice from ``source`` bringing a topic back, or None if nothing does."""
    if left_all_reason == "complained" and source not in LIFTED_BY["complained"]:
        return "complained"
    if (left_all_reason == "bounced" or (left_all_reason == "complained" and bounced)) and (
        source not in LIFTED_BY["bounced"]
    ):
        return "bounced"
    return None


def rejoin(left_all_reason: str | None, bounced: bool, source: str) -> Lift:
    """Return what re-subscribing to all marketing from ``source`` lifts.

    A complaint is never lifted whole: the person chooses topics again in the preference
    center. A hard bounce on file is lifted by those who may lift it, whatever else holds.
    """
    if left_all_reason is None:
        return Lift(False, False, None)
    bounce = (left_all_reason == "bounced" or bounced) and source in LIFTED_BY["bounced"]
    if left_all_reason == "complained":
        return Lift(False, bounce and bounced, "complained")
    if left_all_reason == "bounced" and not bounce:
        return Lift(False, False, "bounced")
    return Lift(True, bounce, None)


def reason_for_leaving_all(recorded: str) -> str:
    """Return the verdict's reason for someone who left all marketing for ``recorded``."""
    return _LEFT_ALL_VERDICT.get(recorded, "unsubscribed_all")


def feed_change(action: str, reason: str | None, scope: str | None) -> tuple[str, str | None] | None:
    """Return what an audit event changed in a mailer's copy of the list, or None if nothing.

    ``("suppressed", reason)`` for an unsubscribe (from one topic, or from all marketing for
    ``reason``), ``("unsuppressed", None)`` for a re-subscription; any other action (a hard
    bounce lifted while a complaint still keeps the address out) changes who may receive
    nothing.
    """
    if action == RESUBSCRIBE:
        return "unsuppressed", None
    if action != UNSUBSCRIBE:
        return None
    return "suppressed", reason_for_leaving_all(reason or "unsubscribed") if scope is None else "unsubscribed"


def suppression(reason: str) -> Verdict:
    """Return the negative verdict for a reason decided before any state is read."""
    return _SUPPRESSED[reason]


def rank(reason: str | None) -> int:
    """Return how strong a reason for leaving all marketing is (``RANK``)."""
    return RANK.get(reason or "", 1)
