"""The preference center: what it shows, what saving records, and leaving all marketing."""

import re

import pytest

from prefs.domain import ledger, topics
from tests.factories import allowed, events, make_subscriber, make_topic, preferences_token, unsubscribe_token

ANN = "ann@example.com"


@pytest.fixture
def ann(session):
    make_topic(session, "news", name="Product news")
    make_topic(session, "promotions", name="Offers")
    make_topic(session, "events", opt_in=True, name="Events")
    make_topic(session, "partners", opt_in=True, name="Partners")
    return make_subscriber(session, ANN)


def checked(page):
    """Return the topic keys whose checkbox is ticked, and those shown at all."""
    boxes = re.findall(r'<input type="checkbox" id="topic-([\w-]+)"[^>]*>', page)
    ticked = re.findall(r'<input type="checkbox" id="topic-([\w-]+)"[^>]* checked[^>]*>', page)
    return set(ticked), set(boxes)


def test_the_center_shows_the_masked_address_and_each_active_topic(client, session, ann):
    topics.create_topic(session, "old", "Old letter", "Gone")
    topics.archive_topic(session, "old")
    response = client.get(f"/p/{preferences_token(ann)}")
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "a***@example.com" in page and ANN not in page
    assert "Product news" in page and "About news" in page
    assert "Old letter" not in page
    ticked, shown = checked(page)
    assert shown == {"news", "promotions", "events", "partners", "transactional"}
    # opt-out topics are sent until someone leaves them; opt-in ones only after a choice
    assert ticked == {"news", "promotions", "transactional"}
    assert "<fieldset>" in page and "<legend>Marketing email</legend>" in page
    assert 'for="topic-news"' in page


def test_the_transactional_row_is_always_on_disabled_and_explained(client, session, ann):
    ledger.record_opt_out(session, ann.public_id, None, ledger.Origin("cli"), reason="complained")
    page = client.get(f"/p/{preferences_token(ann)}").get_data(as_text=True)
    row = re.search(r'<input type="checkbox" id="topic-transactional"[^>]*>', page).group(0)
    assert "checked" in row and "disabled" in row and "name=" not in row
    assert "These are always sent" in page
    assert "<legend>Account and service email</legend>" in page


def test_the_checkboxes_follow_the_verdict(client, session, ann):
    ledger.record_opt_out(session, ann.public_id, "news", ledger.Origin("cli"))
    ledger.record_resubscribe(session, ann.public_id, "events", ledger.Origin("cli"))
    ticked, _ = checked(client.get(f"/p/{preferences_token(ann)}").get_data(as_text=True))
    assert ticked == {"promotions", "events", "transactional"}


def test_an_unsubscribe_token_also_opens_the_center(client, ann):
    response = client.get(f"/p/{unsubscribe_token(ann, 'news', 'c9')}")
    assert response.status_code == 200 and "Product news" in response.get_data(as_text=True)


def test_a_preferences_token_opens_the_center_and_nothing_else(client, session, ann):
    token = preferences_token(ann)
    assert client.get(f"/p/{token}").status_code == 200
    assert client.get(f"/u/{token}").status_code == 400
    assert client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"}).status_code == 400
    assert events(session, ann) == []


def test_saving_records_one_event_per_changed_topic(client, session, ann):
    token = preferences_token(ann)
    # news stays on, promotions goes off, events comes on, partners stays off
    response = client.post(f"/p/{token}", data={"topic": ["news", "events"], "action": "save"})
    assert response.status_code == 303
    assert response.headers["Location"] == f"/p/{token}?done=saved"
    assert sorted(events(session, ann)) == [
        ("resubscribe", "events", "preferences", None),
        ("unsubscribe", "promotions", "preferences", None),
    ]
    assert not allowed(session, ANN, "promotions") and allowed(session, ANN, "events")
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Your choices are saved." in page
    assert checked(page)[0] == {"news", "events", "transactional"}


def test_saving_the_same_choices_again_records_nothing(client, session, ann):
    token = preferences_token(ann)
    client.post(f"/p/{token}", data={"topic": ["news"]})
    before = events(session, ann)
    client.post(f"/p/{token}", data={"topic": ["news"]})
    assert events(session, ann) == before and len(before) == 1


def test_an_unsubscribe_tokens_campaign_goes_into_the_audit_event(client, session, ann):
    client.post(f"/p/{unsubscribe_token(ann, 'news', 'may-letter')}", data={"topic": ["news"]})
    assert events(session, ann) == [("unsubscribe", "promotions", "preferences", "may-letter")]


def test_the_form_cannot_touch_transactional_archived_or_unknown_topics(client, session, ann):
    make_topic(session, "old")
    topics.archive_topic(session, "old")
    data = {"topic": ["news", "promotions", "transactional", "old", "nope", "<x>"]}
    assert client.post(f"/p/{preferences_token(ann)}", data=data).status_code == 303
    assert events(session, ann) == []
    assert allowed(session, ANN, "transactional") and allowed(session, ANN, "old")


def test_the_leave_all_button_leaves_all_marketing(client, session, ann):
    token = preferences_token(ann)
    response = client.post(f"/p/{token}", data={"topic": ["news"], "action": "leave-all"})
    assert response.headers["Location"] == f"/p/{token}?done=left-all"
    assert events(session, ann) == [("unsubscribe", None, "preferences", None)]
    assert not allowed(session, ANN, "news") and allowed(session, ANN, "transactional")
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "You have left all marketing email" in page
    assert checked(page)[0] == {"transactional"}


def test_resubscribing_after_leaving_all_brings_back_that_topic_only(client, session, ann):
    token = preferences_token(ann)
    client.post(f"/p/{token}", data={"action": "leave-all"})
    client.post(f"/p/{token}", data={"topic": ["promotions"]})
    assert allowed(session, ANN, "promotions")
    assert not allowed(session, ANN, "news") and not allowed(session, ANN, "events")
    assert events(session, ann)[-1] == ("resubscribe", "promotions", "preferences", None)
    page = client.get(f"/p/{token}").get_data(as_text=True)
    assert checked(page)[0] == {"promotions", "transactional"}
    assert "You have left all marketing email" in page


def test_the_language_choice_survives_saving(client, ann):
    token = preferences_token(ann)
    response = client.post(f"/p/{token}?lang=de", data={"topic": ["news"]})
    assert response.headers["Location"] == f"/p/{token}?done=saved&lang=de"
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Ihre Auswahl ist gespeichert." in page and '<html lang="de">' in page


def test_an_empty_center_still_shows_the_transactional_row(client, session):
    subscriber = make_subscriber(session, "bo@example.com")
    page = client.get(f"/p/{preferences_token(subscriber)}").get_data(as_text=True)
    assert "There are no marketing topics to choose from." in page
    assert checked(page) == ({"transactional"}, {"transactional"})


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_opening_the_center_changes_nothing(client, session, ann, method):
    for token in (preferences_token(ann), unsubscribe_token(ann, "news")):
        assert client.open(f"/p/{token}?done=left-all", method=method).status_code == 200
    assert events(session, ann) == []
    assert allowed(session, ANN, "news") and not allowed(session, ANN, "events")
