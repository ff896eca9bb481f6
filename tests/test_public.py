"""The unsubscribe link: RFC 8058 one-click, the page and its undo, bad links, the headers."""

import io
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, select

from prefs.domain import ledger, topics
from prefs.models import Event, Subscriber
from tests.factories import allowed, events, make_subscriber, make_topic, preferences_token, unsubscribe_token
from tests.pages import ONE_CLICK, assert_public_headers

ANN = "ann@example.com"


@pytest.fixture
def ann(session):
    make_topic(session, "news", name="Product news")
    make_topic(session, "promotions", name="Offers")
    make_topic(session, "events", opt_in=True, name="Events")
    return make_subscriber(session, ANN)


# one-click (RFC 8058)


def test_one_click_urlencoded_records_the_opt_out_and_answers_200(client, session, ann):
    token = unsubscribe_token(ann, "news", "spring-sale")
    response = client.post(f"/u/{token}", data=ONE_CLICK, environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert response.status_code == 200 and "Location" not in response.headers
    assert_public_headers(response)
    assert not allowed(session, ANN, "news") and allowed(session, ANN, "promotions")
    assert events(session, ann) == [("unsubscribe", "news", "one-click", "spring-sale")]
    fingerprint = session.scalar(select(Event.fingerprint))
    assert fingerprint and "203.0.113.9" not in fingerprint and len(fingerprint) == 32


def test_one_click_multipart_records_the_opt_out(client, session, ann):
    token = unsubscribe_token(ann)
    response = client.post(
        f"/u/{token}", data={"List-Unsubscribe": "One-Click"}, content_type="multipart/form-data"
    )
    assert response.status_code == 200
    assert not allowed(session, ANN, "news") and not allowed(session, ANN, "promotions")
    assert allowed(session, ANN, "transactional")
    assert events(session, ann) == [("unsubscribe", None, "one-click", None)]


def test_one_click_as_a_raw_body_from_a_server_with_no_context(client, session, ann):
    response = client.post(
        f"/u/{unsubscribe_token(ann, 'news')}",
        data=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded", "User-Agent": ""},
    )
    assert response.status_code == 200 and not allowed(session, ANN, "news")


def test_repeating_one_click_is_harmless(client, session, ann):
    token = unsubscribe_token(ann, "news")
    for _ in range(3):
        assert client.post(f"/u/{token}", data=ONE_CLICK).status_code == 200
    assert events(session, ann) == [("unsubscribe", "news", "one-click", None)]


def test_the_one_click_opt_out_is_committed_before_the_200(app, client, ann):
    client.post(f"/u/{unsubscribe_token(ann, 'news')}", data=ONE_CLICK)
    # a connection of its own sees only what was committed
    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    with engine.connect() as conn:
        assert conn.execute(select(Event.action, Event.source)).all() == [("unsubscribe", "one-click")]
    engine.dispose()


def test_an_archived_topics_link_still_unsubscribes(client, session, ann):
    token = unsubscribe_token(ann, "news")
    topics.archive_topic(session, "news")
    assert client.get(f"/u/{token}").status_code == 200
    assert client.post(f"/u/{token}", data=ONE_CLICK).status_code == 200
    assert not allowed(session, ANN, "news")


def test_one_click_is_limited_per_token_only(make_app):
    app = make_app(RATELIMIT_ONE_CLICK="2 per minute")
    with app.app_context():
        from prefs.extensions import session as db_session

        s = db_session()
        make_topic(s, "news")
        first, second = make_subscriber(s, "a@example.com"), make_subscriber(s, "b@example.com")
        one, other = unsubscribe_token(first, "news"), unsubscribe_token(second, "news")
    client = app.test_client()
    assert [client.post(f"/u/{one}", data=ONE_CLICK).status_code for _ in range(2)] == [200, 200]
    limited = client.post(f"/u/{one}", data=ONE_CLICK)
    assert limited.status_code == 429 and 0 < int(limited.headers["Retry-After"]) <= 60
    assert_public_headers(limited)
    # the same mailbox provider (one client) posting another token is not held back
    assert client.post(f"/u/{other}", data=ONE_CLICK).status_code == 200
    # nor is the page: GET is not limited
    assert client.get(f"/u/{one}").status_code == 200


# GET and HEAD never change state


def test_get_asks_and_changes_nothing(client, session, ann):
    response = client.get(f"/u/{unsubscribe_token(ann, 'news')}")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Unsubscribe a***@example.com from Product news?" in page
    assert 'value="all"' in page  # the choice to leave all marketing instead
    assert ANN not in page
    assert events(session, ann) == [] and allowed(session, ANN, "news")


def test_get_of_an_all_marketing_link_asks_about_all_marketing(client, ann):
    page = client.get(f"/u/{unsubscribe_token(ann)}").get_data(as_text=True)
    assert "Unsubscribe a***@example.com from all marketing email?" in page
    assert 'value="all"' not in page


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "GET"])
def test_scanners_fetching_the_link_change_nothing(client, session, ann, method):
    for token in (unsubscribe_token(ann, "news"), unsubscribe_token(ann)):
        response = client.open(f"/u/{token}", method=method)
        assert response.status_code == 200
    assert events(session, ann) == []
    assert allowed(session, ANN, "news") and allowed(session, ANN, "promotions")


# the page's form, with undo


def test_the_page_form_unsubscribes_and_offers_undo_and_the_preference_center(client, session, ann):
    token = unsubscribe_token(ann, "news", "c1")
    response = client.post(f"/u/{token}", data={"scope": "link"})
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and "Location" not in response.headers
    assert "You are unsubscribed from Product news" in page
    assert 'name="action" value="undo"' in page
    assert '<a href="/p/' in page
    assert events(session, ann) == [("unsubscribe", "news", "page", "c1")]
    assert not allowed(session, ANN, "news")


def test_unsubscribing_from_one_topic_shows_the_others_still_received(client, session, ann):
    ledger.record_opt_out(session, ann.public_id, "promotions", ledger.Origin("cli"))
    make_topic(session, "tips", name="Tips and tricks")
    make_topic(session, "old", name="Old letter")
    topics.archive_topic(session, "old")
    page = client.post(f"/u/{unsubscribe_token(ann, 'news')}").get_data(as_text=True)
    still = page.split("You still receive", 1)[1]
    assert "Tips and tricks" in still
    # opt-out topics not left are still sent; the one left, opt-in ones and archived ones are not
    assert "Product news" not in still and "Offers" not in still and "Events" not in still
    assert "Old letter" not in still
    assert "Leave these too" in page


def undo_form(page):
    """Return the fields of the page's undo form, as a browser would post them."""
    found = re.search(
        r'<form method="post" action="[^"]*" class="actions">\s*((?:<input[^>]*>\s*)+)<button[^>]*>Undo', page
    )
    assert found, "no undo form on the page"
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', found.group(1)))


def test_undo_resubscribes_and_is_recorded(client, session, ann):
    token = unsubscribe_token(ann, "news", "c1")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    page = client.post(f"/u/{token}", data=form).get_data(as_text=True)
    assert "You are subscribed to Product news again" in page
    assert allowed(session, ANN, "news")
    assert events(session, ann) == [
        ("unsubscribe", "news", "page", "c1"),
        ("resubscribe", "news", "page", "c1"),
    ]


def test_leaving_all_from_a_topic_link_and_undoing_it(client, session, ann):
    token = unsubscribe_token(ann, "news")
    page = client.post(f"/u/{token}", data={"scope": "all"}).get_data(as_text=True)
    assert "You are unsubscribed from all marketing email" in page
    assert not allowed(session, ANN, "promotions") and allowed(session, ANN, "transactional")
    client.post(f"/u/{token}", data=undo_form(page))
    assert allowed(session, ANN, "promotions") and allowed(session, ANN, "news")
    assert [e[:2] for e in events(session, ann)] == [("unsubscribe", None), ("resubscribe", None)]


# undo reverts exactly what this click did, while it is the latest change


def complained(session, person):
    ledger.record_many(
        session, [ledger.Change(person.public_id, None, False, ledger.Origin("api"), "complained")]
    )


@pytest.mark.parametrize("reason", ["complained", "bounced"])
@pytest.mark.parametrize("scope", ["all", "link"])
def test_an_undo_the_click_never_earned_lifts_no_complaint_and_no_bounce(client, session, ann, reason, scope):
    ledger.record_opt_out(session, ann.public_id, None, ledger.Origin("api"), reason=reason)
    before = events(session, ann)
    for token in (unsubscribe_token(ann), unsubscribe_token(ann, "news", "c1")):
        for form in (
            {"action": "undo", "scope": scope},
            {"action": "undo", "scope": scope, "undo": "forged.1.x"},
            {"action": "undo"},
        ):
            response = client.post(f"/u/{token}", data=form)
            assert 400 <= response.status_code < 500, (form, response.status_code)
            page = response.get_data(as_text=True)
            # an error page: the request form, and no token in any link
            assert "could not undo" in page.lower() and 'action="/unsubscribe"' in page
            assert token not in page
    assert ledger.verdict_for(session, ANN, "news").reason == reason
    assert ledger.verdict_for(session, ANN, "promotions").reason == reason
    assert events(session, ann) == before


def test_a_replayed_undo_form_changes_nothing(client, session, ann):
    token = unsubscribe_token(ann, "news")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    assert client.post(f"/u/{token}", data=form).status_code == 200
    # she unsubscribes again; the first click's undo form must not bring the topic back
    client.post(f"/u/{token}")
    replayed = client.post(f"/u/{token}", data=form)
    assert replayed.status_code == 409 and "could not undo" in replayed.get_data(as_text=True).lower()
    assert token not in replayed.get_data(as_text=True)
    assert not allowed(session, ANN, "news")
    assert [e[0] for e in events(session, ann)] == ["unsubscribe", "resubscribe", "unsubscribe"]


@pytest.mark.parametrize(
    "later",
    [
        lambda s, p: ledger.record_opt_out(s, p.public_id, None, ledger.Origin("api")),
        lambda s, p: complained(s, p),
        lambda s, p: ledger.record_opt_out(s, p.public_id, None, ledger.Origin("api"), reason="bounced"),
        lambda s, p: ledger.record_opt_out(s, p.public_id, None, ledger.Origin("one-click")),
    ],
    ids=["unsubscribe-all", "complaint", "bounce", "one-click-all"],
)
@pytest.mark.parametrize("scope", ["link", "all"])
def test_an_undo_after_a_later_change_for_the_subscriber_and_topic_is_refused(
    client, session, ann, later, scope
):
    token = unsubscribe_token(ann, "news")
    form = undo_form(client.post(f"/u/{token}", data={"scope": scope}).get_data(as_text=True))
    later(session, ann)
    before = [ledger.verdict_for(session, ANN, t) for t in ("news", "promotions", "events")]
    response = client.post(f"/u/{token}", data=form)
    assert response.status_code == 409
    assert [ledger.verdict_for(session, ANN, t) for t in ("news", "promotions", "events")] == before


@pytest.mark.parametrize(
    "later",
    [
        lambda s, p: ledger.record_opt_out(s, p.public_id, "promotions", ledger.Origin("api")),
        # a repeat that changes nothing is still written after the click: the form is stale
        lambda s, p: ledger.record_opt_out(s, p.public_id, "news", ledger.Origin("mailto")),
        lambda s, p: ledger.record_resubscribe(s, p.public_id, "promotions", ledger.Origin("cli")),
    ],
    ids=["another-topic", "same-opt-out-again", "no-op-resubscribe"],
)
def test_any_write_for_the_subscriber_after_the_click_makes_the_undo_stale(client, session, ann, later):
    token = unsubscribe_token(ann, "news")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    later(session, ann)
    assert client.post(f"/u/{token}", data=form).status_code == 409
    assert not allowed(session, ANN, "news")


def test_an_undo_form_works_only_on_the_link_of_its_own_subscriber(client, session, ann):
    bob = make_subscriber(session, "bob@example.com")
    form = undo_form(client.post(f"/u/{unsubscribe_token(ann, 'news')}").get_data(as_text=True))
    client.post(f"/u/{unsubscribe_token(bob, 'news')}")
    response = client.post(f"/u/{unsubscribe_token(bob, 'news')}", data=form)
    assert response.status_code == 400
    assert not allowed(session, ANN, "news") and not allowed(session, "bob@example.com", "news")


def test_an_undo_restores_the_choice_it_replaced_exactly(client, session, ann):
    # events is opt-in: she chose it in the preference center, from a campaign's link
    ledger.record_choices(session, ann.public_id, {"events": True}, ledger.Origin("preferences", "c0"))
    token = unsubscribe_token(ann, "events", "c1")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    assert not allowed(session, ANN, "events")
    client.post(f"/u/{token}", data=form)
    assert allowed(session, ANN, "events")
    [preference] = [p for p in subject_preferences(session) if p["topic"] == "events"]
    assert (preference["subscribed"], preference["source"]) == (True, "preferences")


def subject_preferences(session):
    from prefs.domain.compliance import subjects

    return subjects.export_subject(session, ANN)["preferences"]


def test_an_undo_brings_back_a_topic_the_preference_center_lifted_from_a_complaint(client, session, ann):
    complained(session, ann)
    ledger.record_choices(session, ann.public_id, {"news": True}, ledger.Origin("preferences"))
    assert allowed(session, ANN, "news")
    token = unsubscribe_token(ann, "news")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    assert not allowed(session, ANN, "news")
    assert client.post(f"/u/{token}", data=form).status_code == 200
    assert allowed(session, ANN, "news")
    assert ledger.verdict_for(session, ANN, "promotions").reason == "complained"


def test_undoing_leaving_all_after_a_lifted_complaint_is_not_offered(client, session, ann):
    complained(session, ann)
    ledger.record_choices(session, ann.public_id, {"news": True}, ledger.Origin("preferences"))
    page = client.post(f"/u/{unsubscribe_token(ann)}").get_data(as_text=True)
    # the click took news away again; undoing it would have to restore a complaint's state
    assert not allowed(session, ANN, "news")
    assert 'value="undo"' not in page
    assert ledger.verdict_for(session, ANN, "news").reason == "complained"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_an_undo_form_sent_by_get_or_head_changes_nothing(client, session, ann, method):
    token = unsubscribe_token(ann, "news")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    before = events(session, ann)
    assert client.open(f"/u/{token}", method=method, query_string=form).status_code == 200
    assert events(session, ann) == before and not allowed(session, ANN, "news")


def test_a_one_click_post_carrying_an_undo_form_is_an_opt_out(client, session, ann):
    token = unsubscribe_token(ann, "news")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    client.post(f"/u/{token}", data={**form, **ONE_CLICK})
    assert not allowed(session, ANN, "news")
    assert [e[0] for e in events(session, ann)] == ["unsubscribe"]


# who may lift a complaint or a hard bounce


def test_a_complaint_is_lifted_only_in_the_preference_center_topic_by_topic(client, session, ann):
    complained(session, ann)
    token = unsubscribe_token(ann, "news", "c7")
    # the preference center, opened from the link: ticking news brings news back, and only news
    page = client.get(f"/p/{token}").get_data(as_text=True)
    assert "You have left all marketing email" in page
    response = client.post(f"/p/{token}", data={"action": "save", "topic": ["news"]})
    assert response.status_code == 303
    assert allowed(session, ANN, "news")
    assert ledger.verdict_for(session, ANN, "promotions").reason == "complained"
    lift = ledger.history(session, ann)[-1][0]
    assert (lift.action, lift.source, lift.campaign, lift.reason) == (
        "resubscribe",
        "preferences",
        "c7",
        "complained",
    )
    assert lift.created_at is not None
    # a complaint again takes it away again
    complained(session, ann)
    assert ledger.verdict_for(session, ANN, "news").reason == "complained"


def test_a_page_cannot_lift_a_hard_bounce(client, session, ann):
    ledger.record_opt_out(session, ann.public_id, None, ledger.Origin("api"), reason="bounced")
    before = events(session, ann)
    token = unsubscribe_token(ann, "news")
    page = client.get(f"/p/{token}").get_data(as_text=True)
    assert "bounced" in page.lower()
    client.post(f"/p/{token}", data={"action": "save", "topic": ["news", "events"]})
    assert ledger.verdict_for(session, ANN, "news").reason == "bounced"
    assert ledger.verdict_for(session, ANN, "events").reason == "bounced"
    assert events(session, ann) == before


def test_a_complaint_on_top_of_a_bounce_needs_both_lifts(client, session, ann):
    ledger.record_opt_out(session, ann.public_id, None, ledger.Origin("api"), reason="bounced")
    complained(session, ann)
    token = unsubscribe_token(ann, "news")
    client.post(f"/p/{token}", data={"action": "save", "topic": ["news"]})
    assert ledger.verdict_for(session, ANN, "news").reason == "complained"  # the bounce holds it
    # a mailer who knows the address works again lifts the bounce; the complaint stays
    [result] = ledger.record_many(session, [ledger.Change(ann.public_id, None, True, ledger.Origin("api"))])
    assert (result.changed, result.kept_out) == (True, "complained")
    assert ledger.verdict_for(session, ANN, "news").reason == "complained"
    client.post(f"/p/{token}", data={"action": "save", "topic": ["news"]})
    assert allowed(session, ANN, "news")
    assert ledger.verdict_for(session, ANN, "promotions").reason == "complained"


def test_the_preference_center_opened_from_a_link_records_its_campaign(client, session, ann):
    token = unsubscribe_token(ann, "news", "spring-sale")
    page = client.post(f"/u/{token}").get_data(as_text=True)
    preferences = re.search(r'<a href="(/p/[^"?]+)', page).group(1)
    assert client.post(preferences, data={"action": "save", "topic": ["events"]}).status_code == 303
    assert events(session, ann)[-1] == ("resubscribe", "events", "preferences", "spring-sale")


def test_no_undo_when_nothing_was_being_sent(client, session, ann):
    ledger.record_opt_out(session, ann.public_id, None, ledger.Origin("cli"), reason="complained")
    page = client.post(f"/u/{unsubscribe_token(ann, 'news')}").get_data(as_text=True)
    assert "Nothing changed" in page and 'value="undo"' not in page
    page = client.post(f"/u/{unsubscribe_token(ann)}").get_data(as_text=True)
    assert "Nothing changed" in page and 'value="undo"' not in page
    assert not allowed(session, ANN, "news")


def test_operator_text_is_escaped(client, session):
    make_topic(session, "xss", name="<script>alert(1)</script>")
    subscriber = make_subscriber(session, "o'neil@example.com")
    page = client.get(f"/u/{unsubscribe_token(subscriber, 'xss')}").get_data(as_text=True)
    assert "<script>" not in page and "&lt;script&gt;" in page


# links that cannot be used


def bad_tokens(app, subscriber):
    from prefs.domain.tokens import Tokens

    good = unsubscribe_token(subscriber, "news")
    other_key = Tokens(["some-other-signing-key-0123456789"]).unsubscribe(subscriber.public_id, "news")
    return {
        "tampered": good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"),
        "truncated": good[: len(good) // 2],
        "wrong purpose": preferences_token(subscriber),
        "unknown key": other_key,
        "garbage": "not-a-token",
        "too long": "a" * 300,
    }


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_bad_token_gets_a_friendly_400_with_the_request_form(app, client, session, ann, method):
    for name, token in bad_tokens(app, ann).items():
        response = client.open(f"/u/{token}", method=method, data=ONE_CLICK if method == "POST" else None)
        page = response.get_data(as_text=True)
        assert response.status_code == 400, name
        assert "This link is not valid any more" in page and 'action="/unsubscribe"' in page, name
        assert_public_headers(response)
    assert events(session, ann) == []


def test_a_token_for_a_topic_that_does_not_exist_is_a_friendly_400(client, session, ann):
    token = unsubscribe_token(ann, "ghost")
    for response in (
        client.get(f"/u/{token}"),
        client.post(f"/u/{token}", data=ONE_CLICK),
        client.post(f"/u/{token}"),
    ):
        assert response.status_code == 400
        assert "This link is not valid any more" in response.get_data(as_text=True)


def test_a_token_for_a_subscriber_who_is_gone_is_a_friendly_400(client, session, ann):
    token = unsubscribe_token(ann, "news")
    session.delete(session.get(Subscriber, ann.id))
    session.commit()
    for response in (
        client.get(f"/u/{token}"),
        client.post(f"/u/{token}", data=ONE_CLICK),
        client.get(f"/p/{token}"),
    ):
        assert response.status_code == 400


@pytest.mark.parametrize("path", ["/u/{token}", "/p/{token}", "/unsubscribe"])
def test_an_oversized_body_is_a_friendly_413(make_app, path):
    app = make_app(MAX_BODY_BYTES=1024)
    with app.app_context():
        from prefs.extensions import session as db_session

        token = unsubscribe_token(make_subscriber(db_session(), ANN))
    client = app.test_client()
    url = path.format(token=token)
    for body in (
        {"List-Unsubscribe": "One-Click", "pad": "x" * 4096},
        {"f": (io.BytesIO(b"x" * 4096), "f.bin")},
    ):
        response = client.post(url, data=body)
        assert response.status_code == 413
        assert "too much" in response.get_data(as_text=True)
        assert_public_headers(response)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#%"), min_size=1
    )
)
def test_no_token_produces_a_500(client, token):
    for method in ("GET", "POST"):
        response = client.open(f"/u/{token}", method=method, data=ONE_CLICK)
        assert response.status_code in (400, 404), token
        response = client.open(f"/p/{token}", method=method)
        assert response.status_code in (400, 404), token


# what every public response carries


def test_every_public_response_has_the_privacy_headers_and_no_cookie(make_app):
    app = make_app(RATELIMIT_PER_CLIENT="1 per minute")
    with app.app_context():
        from prefs.extensions import session as db_session

        s = db_session()
        make_topic(s, "news")
        subscriber = make_subscriber(s, ANN)
        u, p = unsubscribe_token(subscriber, "news"), preferences_token(subscriber)
    client = app.test_client()
    responses = {
        "page": client.get(f"/u/{u}"),
        "head": client.head(f"/u/{u}"),
        "one-click": client.post(f"/u/{u}", data=ONE_CLICK),
        "confirmation": client.post(f"/u/{u}"),
        "center": client.get(f"/p/{p}"),
        "save": client.post(f"/p/{p}", data={"topic": "news"}),
        "form": client.get("/unsubscribe"),
        "sent": client.post("/unsubscribe", data={"email": ANN}),
        "limited": client.post("/unsubscribe", data={"email": ANN}),
        "bad link": client.get("/u/nope"),
        "not found": client.get("/nothing/here"),
        "stylesheet": client.get("/pages.css"),
    }
    assert responses["limited"].status_code == 429
    for response in responses.values():
        assert_public_headers(response)
        assert client.get_cookie("session") is None
    for name in ("page", "head", "one-click", "confirmation", "center", "save", "sent", "bad link"):
        assert responses[name].headers["Cache-Control"] == "no-store", name
    assert "max-age" in responses["stylesheet"].headers["Cache-Control"]


def test_pages_have_no_script_and_set_lang(client, ann):
    for path in (f"/u/{unsubscribe_token(ann)}", f"/p/{preferences_token(ann)}", "/unsubscribe", "/u/x"):
        page = client.get(path).get_data(as_text=True)
        assert "<script" not in page and " style=" not in page and "<style" not in page
        assert '<html lang="en">' in page
        assert '<link rel="stylesheet" href="/pages.css?v=' in page


@pytest.mark.parametrize(
    "other",
    [("promotions", "c1"), ("news", "c2"), (None, "c1"), ("news", None)],
    ids=["other-topic", "other-campaign", "no-topic", "no-campaign"],
)
def test_an_undo_form_works_only_on_the_link_whose_click_earned_it(client, session, ann, other):
    token = unsubscribe_token(ann, "news", "c1")
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    response = client.post(f"/u/{unsubscribe_token(ann, *other)}", data=form)
    assert response.status_code == 400
    assert "could not undo" in response.get_data(as_text=True).lower()
    assert not allowed(session, ANN, "news")
    assert [e[0] for e in events(session, ann)] == ["unsubscribe"]
    # the link that earned it still undoes its own click
    assert client.post(f"/u/{token}", data=form).status_code == 200
    assert allowed(session, ANN, "news")


def test_an_undo_form_is_not_taken_on_another_mailing_of_the_same_campaign_and_topic(
    app, client, session, ann
):
    import time

    from prefs.domain.tokens import Tokens

    token = unsubscribe_token(ann, "news", "c1")
    # the same campaign and topic, mailed again a minute later: another link
    later = Tokens(app.config["SECRET_KEYS"], clock=lambda: time.time() + 60).unsubscribe(
        ann.public_id, "news", "c1"
    )
    assert later != token
    form = undo_form(client.post(f"/u/{token}").get_data(as_text=True))
    assert client.post(f"/u/{later}", data=form).status_code == 400
    assert not allowed(session, ANN, "news")
