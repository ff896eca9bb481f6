"""Click through the public pages in Chromium, as a recipient would."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, expect

from prefs.domain import ledger
from tests.factories import allowed, make_subscriber, preferences_token, unsubscribe_token

pytestmark = pytest.mark.browser

DEMO = "demo@example.com"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "preference-center.png"


def links_for(live, email=DEMO, topic="news"):
    def make(session):
        subscriber = make_subscriber(session, email)
        return unsubscribe_token(subscriber, topic, "spring"), preferences_token(subscriber)

    return live.run(make)


def test_unsubscribe_from_the_page_and_undo(live, page: Page):
    token, _ = links_for(live)
    page.goto(f"{live.url}/u/{token}")
    expect(page.get_by_role("heading", level=1)).to_have_text(
        "Unsubscribe d***@example.com from Company news?"
    )
    page.get_by_role("button", name="Unsubscribe", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("You are unsubscribed from Company news")
    assert not live.run(allowed, DEMO, "news")
    # the topics still received are offered too
    expect(page.locator("main").get_by_role("list")).to_contain_text("Offers and promotions")
    page.get_by_role("button", name="Undo: subscribe me again").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("You are subscribed to Company news again")
    assert live.run(allowed, DEMO, "news")
    page.get_by_role("link", name="Manage all your email preferences").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Email preferences")


def test_preference_center_keeps_two_toggled_topics_after_a_reload(live, page: Page):
    _, token = links_for(live)
    page.goto(f"{live.url}/p/{token}")
    news, events = page.get_by_label("Company news"), page.get_by_label("Events")
    expect(news).to_be_checked()
    expect(events).not_to_be_checked()
    news.uncheck()
    events.check()
    page.get_by_role("button", name="Save my choices").click()
    expect(page.get_by_role("status")).to_have_text("Your choices are saved.")
    page.reload()
    expect(page.get_by_label("Company news")).not_to_be_checked()
    expect(page.get_by_label("Events")).to_be_checked()
    expect(page.get_by_label("Offers and promotions")).to_be_checked()
    page.goto(f"{live.url}/p/{token}")
    expect(page.get_by_label("Events")).to_be_checked()
    assert not live.run(allowed, DEMO, "news") and live.run(allowed, DEMO, "events")
    history = live.run(
        lambda s: [(e.action, key, e.source) for e, key in ledger.history(s, make_subscriber(s, DEMO))]
    )
    assert sorted(history) == [
        ("resubscribe", "events", "preferences"),
        ("unsubscribe", "news", "preferences"),
    ]


def test_the_transactional_row_cannot_be_changed(live, page: Page):
    _, token = links_for(live)
    page.goto(f"{live.url}/p/{token}")
    row = page.get_by_label("Receipts, password resets and security notices")
    expect(row).to_be_checked()
    expect(row).to_be_disabled()
    row.click(force=True)
    expect(row).to_be_checked()
    expect(page.get_by_text("These are always sent")).to_be_visible()
    page.get_by_role("button", name="Leave all marketing email").click()
    expect(page.get_by_label("Receipts, password resets and security notices")).to_be_checked()
    assert live.run(allowed, DEMO, "transactional") and not live.run(allowed, DEMO, "promotions")


def test_request_by_address_to_the_delivered_link(live, page: Page):
    page.goto(f"{live.url}/unsubscribe")
    page.get_by_label("Your email address").fill("New.Person@Example.com")
    page.get_by_role("button", name="Send me a link").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your inbox")
    [message] = live.smtp.inbox.wait_for(1)
    assert message["To"] == "new.person@example.com"  # the one normalized form
    link = re.search(r"http://\S+/p/\S+", message.get_body(("plain",)).get_content()).group(0)
    assert urlsplit(link).netloc == urlsplit(live.url).netloc
    page.goto(link)
    expect(page.get_by_text("Choose the email n***@example.com receives from us.")).to_be_visible()
    page.get_by_label("Company news").uncheck()
    page.get_by_role("button", name="Save my choices").click()
    expect(page.get_by_role("status")).to_have_text("Your choices are saved.")
    assert not live.run(allowed, "new.person@example.com", "news")


def test_no_horizontal_scrolling_at_360_pixels(live, browser):
    long_name = "a-rather-long-local-part-for-testing.with.dots@subdomain.example-company.co.uk"
    token, prefs = links_for(live, long_name)
    context = browser.new_context(
        viewport={"width": 360, "height": 640}, device_scale_factor=2, is_mobile=True
    )
    page = context.new_page()
    try:
        for path, method in (
            (f"/u/{token}", "get"),
            (f"/p/{prefs}", "get"),
            (f"/p/{prefs}?lang=de", "get"),
            ("/unsubscribe?lang=fr", "get"),
            ("/u/not-valid", "get"),
            (f"/u/{token}?lang=es", "post"),
        ):
            page.goto(f"{live.url}{path}")
            if method == "post":
                page.get_by_role("button", name="Darse de baja").click()
                expect(page.get_by_role("heading", level=1)).to_be_visible()
            width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1] == 360, path
    finally:
        context.close()


def test_keyboard_only_unsubscribe(live, page: Page):
    token, _ = links_for(live)
    page.goto(f"{live.url}/u/{token}")
    for _ in range(5):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent.trim()") == "Unsubscribe":
            break
    focused = page.locator(":focus")
    expect(focused).to_have_text("Unsubscribe")
    outline = focused.evaluate(
        "e => getComputedStyle(e).outlineStyle + ' ' + getComputedStyle(e).outlineWidth"
    )
    assert outline == "solid 3px"  # focus is visible
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("You are unsubscribed from Company news")
    assert not live.run(allowed, DEMO, "news")


def test_screenshot_of_the_preference_center(live, page: Page):
    _, token = links_for(live)
    page.set_viewport_size({"width": 720, "height": 900})
    page.goto(f"{live.url}/p/{token}")
    expect(page.get_by_role("heading", level=1)).to_have_text("Email preferences")
    image = page.screenshot(full_page=True)
    assert image.startswith(b"\x89PNG") and len(image) > 10_000
    # written only when it changed, so a test run leaves the work tree clean
    if not SCREENSHOT.exists() or SCREENSHOT.read_bytes() != image:
        SCREENSHOT.write_bytes(image)
