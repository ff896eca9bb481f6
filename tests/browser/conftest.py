"""Serve the app on 127.0.0.1 and drive Debian's Chromium with Playwright.

Playwright's own browser download does not work on these machines: the suite uses
``/usr/bin/chromium``, and fails (never skips) when it cannot start.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from playwright.sync_api import Browser, Page, sync_playwright
from werkzeug.serving import make_server

from prefs.extensions import session as db_session
from tests.factories import make_subscriber, make_topic
from tests.smtp import free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TOPICS = (
    ("news", "Company news", "What we are building and why, about once a month.", False),
    ("promotions", "Offers and promotions", "Discounts and seasonal offers.", False),
    ("events", "Events", "Invitations to webinars and meet-ups near you.", True),
    ("partners", "Affiliates and partners", "Offers from companies we work with.", True),
)


@dataclass
class Live:
    """The app served on loopback, with what the tests need to reach it."""

    app: Flask
    url: str
    smtp: Any

    def run(self, fn: Any, *args: Any) -> Any:
        """Call ``fn(session, *args)`` inside the served app's context."""
        with self.app.app_context():
            return fn(db_session(), *args)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Start headless Chromium once for the suite; a browser that cannot start fails the tests."""
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        except Exception as err:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {err}", pytrace=False)
        yield chromium
        chromium.close()


@pytest.fixture
def live(make_app: Any, smtp_server: Any) -> Iterator[Live]:
    """Serve a fresh app in a thread on 127.0.0.1 at a random port, mailing through aiosmtpd."""
    port = free_port()
    # links in mail lead back to this server, as PREFS_BASE_URL makes them do in production
    origin = f"http://127.0.0.1:{port}"
    app = make_app(BASE_URL=origin, SMTP_URL=smtp_server.url, BRAND_NAME="Example Shop")
    with app.app_context():
        s = db_session()
        for key, name, description, opt_in in TOPICS:
            make_topic(s, key, opt_in=opt_in, name=name).description = description
        s.commit()
        make_subscriber(s, "demo@example.com")
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Live(app, origin, smtp_server)
    server.shutdown()
    thread.join(timeout=5)
    server.server_close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """Return a fresh tab in a context of its own (no shared state between tests)."""
    context = browser.new_context(viewport={"width": 1024, "height": 800}, locale="en-GB")
    context.set_default_timeout(5000)
    tab = context.new_page()
    yield tab
    context.close()
