"""The rule table: every row, and the precedence between rows."""

import itertools

import pytest

from prefs.domain.rules import (
    ALLOWED,
    LEFT_ALL_REASONS,
    STRANGER,
    TRANSACTIONAL_CATEGORY,
    Category,
    Lift,
    State,
    Verdict,
    rejoin,
    verdict,
)

NEWS = Category("news", opt_in=False)
EVENTS = Category("events", opt_in=True)


def every_state():
    """Yield every combination of recorded state the rule can see."""
    for erased, left, chosen, source, bounced in itertools.product(
        (False, True),
        (None, *LEFT_ALL_REASONS),
        (None, True, False),
        ("page", "preferences", "api"),
        (False, True),
    ):
        for left_version, version in ((None, None), (3, 2), (3, 5), (None, 4)):
            yield State(
                erased=erased,
                left_all_reason=left,
                left_all_version=left_version if left else None,
                subscribed=chosen,
                version=version if chosen is not None else None,
                source=source if chosen is not None else None,
                bounced=bounced,
            )


@pytest.mark.parametrize("state", list(every_state()))
def test_transactional_is_allowed_whatever_is_recorded(state):
    assert verdict(state, TRANSACTIONAL_CATEGORY) == Verdict(True, None)


@pytest.mark.parametrize("category", [NEWS, EVENTS])
def test_erased_addresses_get_no_marketing(category):
    state = State(erased=True, subscribed=True, version=9)
    assert verdict(state, category) == Verdict(False, "erased")


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("unsubscribed", "unsubscribed_all"),
        ("imported", "unsubscribed_all"),
        ("support", "unsubscribed_all"),
        ("complained", "complained"),
        ("bounced", "bounced"),
    ],
)
@pytest.mark.parametrize("category", [NEWS, EVENTS])
def test_leaving_all_marketing_blocks_every_topic(reason, expected, category):
    state = State(left_all_reason=reason, left_all_version=4)
    assert verdict(state, category) == Verdict(False, expected)


def test_leaving_all_marketing_beats_an_older_topic_choice():
    state = State(left_all_reason="unsubscribed", left_all_version=4, subscribed=True, version=3)
    assert verdict(state, NEWS) == Verdict(False, "unsubscribed_all")


def test_a_newer_topic_choice_after_leaving_all_brings_back_that_topic_only():
    back = State(
        left_all_reason="unsubscribed", left_all_version=4, subscribed=True, version=5, source="page"
    )
    untouched = State(left_all_reason="unsubscribed", left_all_version=4)
    assert verdict(back, NEWS) == ALLOWED
    # the default of an opt-out topic no longer applies to someone who left everything
    assert verdict(untouched, NEWS) == Verdict(False, "unsubscribed_all")


def test_a_newer_topic_opt_out_after_leaving_all_reads_as_that_topic():
    state = State(left_all_reason="complained", left_all_version=4, subscribed=False, version=5)
    assert verdict(state, NEWS) == Verdict(False, "unsubscribed")


@pytest.mark.parametrize("category", [NEWS, EVENTS])
def test_explicit_choice_wins_over_the_default(category):
    assert verdict(State(subscribed=True, version=1), category) == ALLOWED
    assert verdict(State(subscribed=False, version=1), category) == Verdict(False, "unsubscribed")


def test_defaults():
    assert verdict(STRANGER, NEWS) == ALLOWED
    assert verdict(STRANGER, EVENTS) == Verdict(False, "not_subscribed")


@pytest.mark.parametrize("state", list(every_state()))
@pytest.mark.parametrize("category", [NEWS, EVENTS])
def test_a_verdict_is_allowed_exactly_when_it_has_no_reason(state, category):
    result = verdict(state, category)
    assert result.allowed is (result.reason is None)


# who may lift a complaint or a hard bounce with a later choice


@pytest.mark.parametrize("source", ["one-click", "page", "preferences", "mailto", "api", "import", "cli"])
@pytest.mark.parametrize("category", [NEWS, EVENTS])
def test_a_later_choice_lifts_a_plain_unsubscribe_whatever_its_source(source, category):
    for reason in ("unsubscribed", "imported", "support"):
        state = State(left_all_reason=reason, left_all_version=4, subscribed=True, version=5, source=source)
        assert verdict(state, category) == ALLOWED


@pytest.mark.parametrize("source", ["one-click", "page", "preferences", "mailto", "api", "import", "cli"])
def test_only_the_preference_center_lifts_a_complaint(source):
    state = State(left_all_reason="complained", left_all_version=4, subscribed=True, version=5, source=source)
    expected = ALLOWED if source == "preferences" else Verdict(False, "complained")
    assert verdict(state, NEWS) == expected
    # and never while a hard bounce is on file too
    assert verdict(state._replace(bounced=True), NEWS) == Verdict(False, "complained")


@pytest.mark.parametrize("source", ["one-click", "page", "preferences", "mailto", "api", "import", "cli"])
def test_only_a_mailer_or_an_operator_lifts_a_hard_bounce(source):
    state = State(left_all_reason="bounced", left_all_version=4, subscribed=True, version=5, source=source)
    expected = ALLOWED if source in ("api", "cli") else Verdict(False, "bounced")
    assert verdict(state, NEWS) == expected


def test_a_bounce_on_file_without_leaving_all_marketing_blocks_nothing():
    assert verdict(State(bounced=True), NEWS) == ALLOWED


@pytest.mark.parametrize(
    ("reason", "bounced", "source", "lift"),
    [
        (None, False, "page", Lift(False, False, None)),
        ("unsubscribed", False, "page", Lift(True, False, None)),
        ("imported", False, "api", Lift(True, False, None)),
        ("bounced", True, "api", Lift(True, True, None)),
        ("bounced", True, "cli", Lift(True, True, None)),
        ("bounced", True, "page", Lift(False, False, "bounced")),
        ("bounced", True, "preferences", Lift(False, False, "bounced")),
        ("complained", False, "api", Lift(False, False, "complained")),
        ("complained", False, "preferences", Lift(False, False, "complained")),
        ("complained", True, "api", Lift(False, True, "complained")),
        ("complained", True, "page", Lift(False, False, "complained")),
    ],
)
def test_rejoining_all_marketing_lifts_what_its_source_may(reason, bounced, source, lift):
    assert rejoin(reason, bounced, source) == lift
