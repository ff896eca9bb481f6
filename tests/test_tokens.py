"""Signed links: purposes, rotation, tampering, length."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import TimestampSigner

from prefs.domain.tokens import Tokens, UnsubscribeToken
from prefs.errors import InvalidToken, InvalidValue

OLD = "old-key-0123456789abcdef"
NEW = "new-key-0123456789abcdef"
PID = "AbCdEfGhIjKlMnOp"


def test_unsubscribe_round_trip():
    tokens = Tokens([NEW])
    token = tokens.unsubscribe(PID, "news", "spring-2026")
    assert tokens.read_unsubscribe(token) == UnsubscribeToken(PID, "news", "spring-2026")


def test_all_marketing_and_no_campaign():
    tokens = Tokens([NEW])
    assert tokens.read_unsubscribe(tokens.unsubscribe(PID)) == UnsubscribeToken(PID, None, None)


def test_preferences_round_trip():
    tokens = Tokens([NEW])
    assert tokens.read_preferences(tokens.preferences(PID)) == PID


def test_fast_signing_equals_itsdangerous():
    tokens = Tokens([OLD, NEW])
    token = tokens.unsubscribe(PID, "news")
    value, _, _ = token.rpartition(".")
    reference = TimestampSigner([OLD, NEW], salt="prefs.unsubscribe")
    # same key, same salt, same timestamp: the same signature
    assert reference.get_signature(value).decode() == token.rpartition(".")[2]


@settings(max_examples=200)
@given(
    key=st.text(min_size=1, max_size=200),
    public_id=st.from_regex(r"[A-Za-z0-9_-]{16,22}", fullmatch=True),
    topic=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True),
)
def test_the_bulk_minter_signs_as_itsdangerous_does(key, public_id, topic):
    # the check's minter writes HMAC out by hand: any key, any value, the same signature
    tokens = Tokens([key])
    token = tokens.unsubscribe_minter(topic, "spring-2026")(public_id)
    value, _, signature = token.rpartition(".")
    assert TimestampSigner([key], salt="prefs.unsubscribe").get_signature(value).decode() == signature
    assert tokens.read_unsubscribe(token) == UnsubscribeToken(public_id, topic, "spring-2026")
    preferences = tokens.preferences_minter()(public_id)
    assert tokens.read_preferences(preferences) == public_id


def test_a_token_of_one_purpose_never_validates_as_another():
    tokens = Tokens([NEW])
    with pytest.raises(InvalidToken):
        tokens.read_unsubscribe(tokens.preferences(PID))
    with pytest.raises(InvalidToken):
        tokens.read_preferences(tokens.unsubscribe(PID, "news"))


def test_the_preference_center_opens_with_either_token():
    tokens = Tokens([NEW])
    assert tokens.read_for_preferences(tokens.unsubscribe(PID, "news")) == PID
    assert tokens.read_for_preferences(tokens.preferences(PID)) == PID


def test_rotation_old_links_verify_and_new_links_use_the_new_key():
    old_token = Tokens([OLD]).unsubscribe(PID, "news")
    rotated = Tokens([OLD, NEW])
    assert rotated.read_unsubscribe(old_token).public_id == PID
    new_token = rotated.unsubscribe(PID, "news")
    assert Tokens([NEW]).read_unsubscribe(new_token).public_id == PID
    with pytest.raises(InvalidToken):
        Tokens([OLD]).read_unsubscribe(new_token)


def test_a_removed_key_is_rejected():
    old_token = Tokens([OLD]).unsubscribe(PID, "news")
    with pytest.raises(InvalidToken):
        Tokens([NEW]).read_unsubscribe(old_token)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-1],
        lambda t: t[: len(t) // 2],
        lambda t: "X" + t[1:],
        lambda t: t.replace(".news.", ".promo."),
        lambda t: t + "A",
        lambda t: "",
        lambda t: "." * 10,
        lambda t: t * 40,
        lambda t: t.replace("A", "é"),
    ],
)
def test_tampered_tokens_raise_the_domain_error(mangle):
    tokens = Tokens([NEW])
    with pytest.raises(InvalidToken):
        tokens.read_unsubscribe(mangle(tokens.unsubscribe(PID, "news")))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_random_text_is_never_a_token(text):
    tokens = Tokens([NEW])
    for read in (tokens.read_unsubscribe, tokens.read_preferences, tokens.read_for_preferences):
        with pytest.raises(InvalidToken):
            read(text)


def test_links_are_short():
    token = Tokens([NEW]).unsubscribe("AbCdEfGhIjKlMnOp", "promotions", "2026-11-black-friday")
    url = f"https://prefs.example.com/u/{token}"
    assert len(url) < 120
    assert "@" not in url


@pytest.mark.parametrize("campaign", ["", "x" * 65, "has space", "a/b", "ünï"])
def test_campaign_ids_are_checked(campaign):
    with pytest.raises(InvalidValue):
        Tokens([NEW]).unsubscribe(PID, "news", campaign)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tokens_do_not_expire_unless_a_maximum_age_is_set():
    clock = Clock()
    token = Tokens([NEW], clock=clock).unsubscribe(PID, "news")
    clock.now += 400 * 86400
    assert Tokens([NEW], clock=clock).read_unsubscribe(token).public_id == PID
    with pytest.raises(InvalidToken):
        Tokens([NEW], max_age=60 * 86400, clock=clock).read_unsubscribe(token)


@pytest.mark.parametrize(
    ("ahead", "good"), [(2, True), (299, True), (300, True), (301, False), (86400, False)]
)
def test_a_link_minted_on_a_clock_ahead_is_good_up_to_five_minutes(ahead, good):
    here = Clock()
    there = Tokens([NEW], clock=Clock(here.now + ahead))
    reader = Tokens([NEW], max_age=3600, clock=here)
    links = [
        (reader.read_unsubscribe, there.unsubscribe(PID, "news", "c1")),
        (reader.read_unsubscribe, there.unsubscribe_minter("news")(PID)),  # the check's bulk minter
        (reader.read_preferences, there.preferences(PID)),
    ]
    for read, link in links:
        if good:
            read(link)
        else:
            with pytest.raises(InvalidToken):
                read(link)


def test_a_link_minted_ahead_still_expires_its_maximum_age_after_it_was_minted():
    here = Clock()
    token = Tokens([NEW], clock=Clock(here.now + 299)).unsubscribe(PID, "news")
    reader = Tokens([NEW], max_age=3600, clock=here)
    here.now += 299 + 3600
    assert reader.read_unsubscribe(token).public_id == PID
    here.now += 1
    with pytest.raises(InvalidToken):
        reader.read_unsubscribe(token)


def test_without_a_maximum_age_the_minting_time_is_not_checked():
    # links already in inboxes, minted by a host whose clock was far off, keep working
    here = Clock()
    token = Tokens([NEW], clock=Clock(here.now + 30 * 86400)).unsubscribe(PID, "news")
    assert Tokens([NEW], clock=here).read_unsubscribe(token).public_id == PID
