"""Recording opt-outs and re-subscriptions: state, idempotence, and one audit event per change."""

import re

import pytest
from sqlalchemy import func, select

from prefs.domain import ledger
from prefs.domain.changes import Origin
from prefs.domain.rules import Verdict
from prefs.errors import InvalidValue, UnknownSubscriber, UnknownTopic
from prefs.models import Event, Subscriber
from tests.factories import events as trail
from tests.factories import make_subscriber, make_topic

TOKEN_SAFE = re.compile(r"[A-Za-z0-9_-]+")

PAGE = Origin("page", campaign="c-1", fingerprint="f" * 32)
CLI = Origin("cli")


def events(session):
    return session.scalars(select(Event).order_by(Event.id)).all()


def verdict(session, key, email="ann@example.com"):
    return ledger.verdict_for(session, email, key)


def test_one_address_one_subscriber(session):
    first = make_subscriber(session, "ann@example.com")
    again = make_subscriber(session, "ann@example.com")
    assert first.id == again.id
    assert session.scalar(select(func.count()).select_from(Subscriber)) == 1
    assert len(first.public_id) == 16 and first.public_id != str(first.id)


def test_a_batch_of_public_ids_shares_only_a_random_prefix():
    batches = [ledger.new_public_ids(1000) for _ in range(3)]
    for ids in batches:
        assert len(set(ids)) == 1000
        assert all(len(i) == 16 and TOKEN_SAFE.fullmatch(i) for i in ids)
        assert {i[:4] for i in ids} == {ids[0][:4]}  # side by side in the index
        assert len({i[4] for i in ids}) > 32  # the rest is each id's own
    # drawn per batch, not fixed: three equal by chance once in 2**48
    assert len({ids[0][:4] for ids in batches}) > 1
    assert ledger.new_public_ids(0) == []


def test_opt_out_of_a_topic_is_recorded_with_its_event(session):
    make_topic(session, "news")
    make_topic(session, "promo")
    ann = make_subscriber(session)
    assert ledger.record_opt_out(session, ann.public_id, "news", PAGE) is True
    assert verdict(session, "news") == Verdict(False, "unsubscribed")
    assert verdict(session, "promo").allowed
    [event] = events(session)
    assert (event.action, event.source, event.campaign, event.reason) == (
        "unsubscribe",
        "page",
        "c-1",
        None,
    )
    assert event.subscriber_id == ann.id and event.topic_id is not None
    assert event.fingerprint == "f" * 32


def test_repeating_an_opt_out_changes_nothing(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, "news", PAGE)
    assert ledger.record_opt_out(session, ann.public_id, "news", PAGE) is False
    assert len(events(session)) == 1


def test_leaving_all_marketing(session):
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    ann = make_subscriber(session)
    assert ledger.record_opt_out(session, ann.public_id, None, PAGE)
    assert verdict(session, "news") == Verdict(False, "unsubscribed_all")
    assert verdict(session, "events") == Verdict(False, "unsubscribed_all")
    assert verdict(session, "transactional") == Verdict(True, None)
    assert ledger.record_opt_out(session, ann.public_id, None, PAGE) is False
    [event] = events(session)
    assert (event.action, event.topic_id, event.reason) == ("unsubscribe", None, "unsubscribed")


def test_a_complaint_is_kept_over_a_later_plain_unsubscribe(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, CLI, reason="complained")
    assert ledger.record_opt_out(session, ann.public_id, None, CLI, reason="unsubscribed") is False
    assert verdict(session, "news") == Verdict(False, "complained")
    # a bounce after a complaint does not hide the complaint either
    assert ledger.record_opt_out(session, ann.public_id, None, CLI, reason="bounced") is False
    assert verdict(session, "news") == Verdict(False, "complained")


def test_a_complaint_replaces_a_plain_unsubscribe(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, CLI, reason="unsubscribed")
    assert ledger.record_opt_out(session, ann.public_id, None, CLI, reason="complained") is True
    assert verdict(session, "news") == Verdict(False, "complained")


def test_resubscribing_after_leaving_all_brings_back_that_topic_only(session):
    make_topic(session, "news")
    make_topic(session, "promo")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, PAGE)
    assert ledger.record_resubscribe(session, ann.public_id, "news", Origin("preferences"))
    assert verdict(session, "news").allowed
    assert verdict(session, "promo") == Verdict(False, "unsubscribed_all")


def test_an_old_choice_does_not_survive_leaving_all(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_resubscribe(session, ann.public_id, "news", PAGE)
    ledger.record_opt_out(session, ann.public_id, None, PAGE)
    assert verdict(session, "news") == Verdict(False, "unsubscribed_all")
    # choosing the topic again is a change, though the stored choice was already "on"
    assert ledger.record_resubscribe(session, ann.public_id, "news", PAGE).changed is True
    assert verdict(session, "news").allowed


def test_leaving_all_again_after_coming_back_is_a_change(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, PAGE)
    ledger.record_resubscribe(session, ann.public_id, "news", PAGE)
    assert ledger.record_opt_out(session, ann.public_id, None, PAGE) is True
    assert verdict(session, "news") == Verdict(False, "unsubscribed_all")


def test_undoing_leaving_all_restores_defaults_and_earlier_choices(session):
    make_topic(session, "news")
    make_topic(session, "promo")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, "promo", PAGE)
    ledger.record_opt_out(session, ann.public_id, None, PAGE)
    assert ledger.record_resubscribe(session, ann.public_id, None, PAGE).changed is True
    assert verdict(session, "news").allowed
    assert verdict(session, "promo") == Verdict(False, "unsubscribed")
    assert ledger.record_resubscribe(session, ann.public_id, None, PAGE).changed is False


def test_opt_in_topics_need_a_choice(session):
    make_topic(session, "events", opt_in=True)
    ann = make_subscriber(session)
    assert verdict(session, "events") == Verdict(False, "not_subscribed")
    ledger.record_resubscribe(session, ann.public_id, "events", PAGE)
    assert verdict(session, "events").allowed


def test_record_choices_saves_a_form_in_one_go(session):
    make_topic(session, "news")
    make_topic(session, "promo")
    make_topic(session, "events", opt_in=True)
    ann = make_subscriber(session)
    changed = ledger.record_choices(
        session, ann.public_id, {"news": False, "promo": True, "events": True}, PAGE
    )
    # promo is an opt-out topic she receives already: choosing it changes nothing
    assert changed == ["news", "events"]
    again = ledger.record_choices(
        session, ann.public_id, {"news": False, "promo": True, "events": True}, PAGE
    )
    assert again == []
    assert len(events(session)) == 2


def test_unknown_topics_and_subscribers_are_errors(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    with pytest.raises(UnknownTopic):
        ledger.record_opt_out(session, ann.public_id, "nope", PAGE)
    with pytest.raises(UnknownTopic):
        verdict(session, "nope")
    with pytest.raises(UnknownSubscriber):
        ledger.record_opt_out(session, "NoSuchPublicId00", "news", PAGE)
    with pytest.raises(UnknownSubscriber):
        ledger.record_opt_out(session, "NoSuchPublicId00", None, PAGE)
    assert events(session) == []


def test_unknown_sources_and_reasons_are_refused(session):
    ann = make_subscriber(session)
    with pytest.raises(InvalidValue):
        Origin("carrier-pigeon")
    with pytest.raises(InvalidValue):
        ledger.record_opt_out(session, ann.public_id, None, PAGE, reason="bored")


def test_a_stranger_gets_the_topic_default(session):
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    assert verdict(session, "news", "new@example.com").allowed
    assert verdict(session, "events", "new@example.com") == Verdict(False, "not_subscribed")


def test_history_lists_every_change_in_order(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, "news", PAGE)
    ledger.record_resubscribe(session, ann.public_id, "news", CLI)
    ledger.record_opt_out(session, ann.public_id, None, CLI, reason="support")
    rows = ledger.history(session, ann)
    assert [(e.action, key, e.source) for e, key in rows] == [
        ("unsubscribe", "news", "page"),
        ("resubscribe", "news", "cli"),
        ("unsubscribe", None, "cli"),
    ]


def test_events_carry_the_writing_transaction_on_postgresql(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, "news", PAGE)
    ledger.record_opt_out(session, ann.public_id, None, PAGE)
    first, second = events(session)
    if session.get_bind().dialect.name == "postgresql":
        assert 0 < first.txid < second.txid
    else:
        assert first.txid == second.txid == 0


def test_choosing_an_opt_out_topic_one_already_receives_records_nothing(session):
    # it once stored the choice and an audit event, so the trail held a "resubscribe" that
    # changed nothing (found by sixteen writers on one subscriber)
    make_topic(session, "news")
    ann = make_subscriber(session)
    assert ledger.record_resubscribe(session, ann.public_id, "news", PAGE).changed is False
    assert events(session) == []
    assert ledger.record_opt_out(session, ann.public_id, "news", PAGE) is True
    assert ledger.record_resubscribe(session, ann.public_id, "news", PAGE).changed is True
    assert ledger.record_resubscribe(session, ann.public_id, "news", PAGE).changed is False
    assert [e.action for e in events(session)] == ["unsubscribe", "resubscribe"]
    assert verdict(session, "news").allowed


def test_a_batch_is_recorded_in_lock_order_and_one_subscribers_changes_in_the_order_given(
    session, monkeypatch
):
    make_topic(session, "news")
    ann, bob = make_subscriber(session, "ann@example.com"), make_subscriber(session, "bob@example.com")
    api = Origin("api")
    later, earlier = sorted([ann, bob], key=lambda s: s.public_id, reverse=True)
    changes = [
        ledger.Change(later.public_id, "news", False, api),
        ledger.Change(earlier.public_id, "news", False, api),
        ledger.Change(later.public_id, "news", True, api),
        ledger.Change(later.public_id, "news", True, api),
        ledger.Change(earlier.public_id, None, False, api),
        ledger.Change(later.public_id, "news", False, api),
    ]
    applied = []
    apply = ledger._apply

    def noted(writer, change):
        applied.append(next(i for i, c in enumerate(changes) if c is change))
        return apply(writer, change)

    monkeypatch.setattr(ledger, "_apply", noted)
    # answered in the order given; the later subscriber's repeat changes nothing
    assert [r.changed for r in ledger.record_many(session, changes)] == [True, True, True, False, True, True]
    # rows are locked in public id order (the earlier subscriber's first), each one's changes in turn
    assert applied == [1, 4, 0, 2, 3, 5]
    assert [e[0] for e in trail(session, later)] == ["unsubscribe", "resubscribe", "unsubscribe"]
    assert [e[0] for e in trail(session, earlier)] == ["unsubscribe", "unsubscribe"]


# lifting a complaint or a hard bounce


PREFERENCES = Origin("preferences", campaign="c-7")
API = Origin("api", campaign="c-8")


def test_a_complaint_is_lifted_only_by_the_preference_center_and_the_lift_is_recorded(session):
    make_topic(session, "news")
    make_topic(session, "promo")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, API, reason="complained")
    for origin in (PAGE, CLI, API, Origin("import"), Origin("mailto"), Origin("one-click")):
        for topic in ("news", None):
            result = ledger.record_resubscribe(session, ann.public_id, topic, origin)
            assert (result.changed, result.kept_out) == (False, "complained"), (origin.source, topic)
    assert len(events(session)) == 1
    assert ledger.record_resubscribe(session, ann.public_id, "news", PREFERENCES).changed is True
    assert verdict(session, "news").allowed and verdict(session, "promo") == Verdict(False, "complained")
    lift = events(session)[-1]
    assert (lift.action, lift.reason, lift.source, lift.campaign) == (
        "resubscribe",
        "complained",
        "preferences",
        "c-7",
    )


def test_a_hard_bounce_is_lifted_only_by_the_api_or_the_cli(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    for origin in (PAGE, PREFERENCES, Origin("import"), Origin("mailto"), Origin("one-click")):
        ledger.record_opt_out(session, ann.public_id, None, API, reason="bounced")
        for topic in ("news", None):
            result = ledger.record_resubscribe(session, ann.public_id, topic, origin)
            assert (result.changed, result.kept_out) == (False, "bounced"), (origin.source, topic)
    for origin in (API, CLI):
        ledger.record_opt_out(session, ann.public_id, None, API, reason="bounced")
        assert ledger.record_resubscribe(session, ann.public_id, None, origin).changed is True
        assert verdict(session, "news").allowed
        session.expire_all()
        assert ann.bounced_at is None  # the address works again: no warning on transactional mail
        lift = events(session)[-1]
        assert (lift.action, lift.topic_id, lift.reason, lift.source) == (
            "resubscribe",
            None,
            "bounced",
            origin.source,
        )


def test_leaving_all_again_keeps_the_stronger_reason(session):
    make_topic(session, "news")
    make_topic(session, "promo")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, API, reason="complained")
    ledger.record_resubscribe(session, ann.public_id, "news", PREFERENCES)
    # a plain unsubscribe from all takes news away again, and the complaint stays the reason
    assert ledger.record_opt_out(session, ann.public_id, None, PAGE) is True
    assert verdict(session, "news") == Verdict(False, "complained")
    assert ledger.record_resubscribe(session, ann.public_id, "promo", API).kept_out == "complained"
    assert verdict(session, "promo") == Verdict(False, "complained")


def test_a_bounce_after_a_lifted_complaint_keeps_the_complaint_and_blocks_the_page(session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    ledger.record_opt_out(session, ann.public_id, None, API, reason="complained")
    ledger.record_resubscribe(session, ann.public_id, "news", PREFERENCES)
    ledger.record_opt_out(session, ann.public_id, None, API, reason="bounced")
    assert verdict(session, "news") == Verdict(False, "complained")
    assert ledger.record_resubscribe(session, ann.public_id, "news", PREFERENCES).kept_out == "bounced"
    # the bounce lifted by the API, the complaint stays; then the preference center lifts news
    result = ledger.record_resubscribe(session, ann.public_id, None, API)
    assert (result.changed, result.kept_out) == (True, "complained")
    assert verdict(session, "news") == Verdict(False, "complained")
    assert ledger.record_resubscribe(session, ann.public_id, "news", PREFERENCES).changed is True
    assert verdict(session, "news").allowed
