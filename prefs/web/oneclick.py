"""RFC 8058 one-click: one answerer for ``POST /u/<token>``, and a WSGI layer that calls it early.

After a campaign, mailbox providers post ``List-Unsubscribe=One-Click`` to its links in
bursts. ``OneClick.answer`` answers that request whole: it reads the link, counts it against
the link's rate limit, records the opt-out (committed before the 200, through the ledger's
group commit on a connection of its own) and returns the page. Its pages say the same to
everyone, so they are rendered for every language when the app is made.

Two callers, one answer:

- ``FastPath`` sits beneath Flask and answers a plain one-click (the exact form RFC 8058
  prescribes, no query, a host the app serves) without Flask's request machinery, whose
  contexts, hooks and session cost as much as the opt-out itself;
- the view (``public.unsubscribe``) answers every other one-click, one with a query or a
  ``charset`` in its form for instance, by calling the same ``answer``.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from flask_babel import force_locale
from limits import RateLimitItem, parse_many
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.test import EnvironBuilder

from ..domain import ledger, privacy
from ..domain.changes import Origin
from ..errors import InvalidToken, UnknownSubscriber, UnknownTopic
from ..extensions import db, limiter, session
from ..ops import monitoring
from ..ops.logs import request_id
from . import hosts, i18n, ratelimit
from .i18n import LANGUAGES

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

ROUTE = "/u/<token>"
PREFIX = ROUTE.partition("<")[0]
ONE_CLICK = "One-Click"
BODY = f"List-Unsubscribe={ONE_CLICK}".encode()
FORM = "application/x-www-form-urlencoded"
# the rate limit's own namespace in the limiter's storage, beside Flask-Limiter's
NAMESPACE = ("prefs", "one-click")
EXTENSION = "prefs.one_click"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
UNAVAILABLE_RETRY_AFTER = "5"


@dataclass(frozen=True)
class Answer:
    """A one-click's whole answer: status, headers and page."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


class OneClick:
    """The app's one-click answerer: its pages, its limit, its engine and fingerprint key."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.tokens = app.extensions["prefs.tokens"]
        self.limits: list[RateLimitItem] = sorted(parse_many(app.config["RATELIMIT_ONE_CLICK"]))
        self.pages = {(status, lang): _render(app, status, lang) for status in REASONS for lang in LANGUAGES}
        self._database: tuple[Engine, bytes] | None = None

    def answer(self, token: str, ip: str | None, user_agent: str | None, lang: str) -> Answer:
        """Answer a one-click POST to the link ``token``: record its opt-out, or say why not."""
        try:
            link = self.tokens.read_unsubscribe(token)
        except InvalidToken:
            return self.page(400, lang)
        try:
            engine, key = self.database()
            retry_after = self.limited(token, key)
            if retry_after is not None:
                return self.page(429, lang, [("Retry-After", str(retry_after))])
            origin = Origin("one-click", link.campaign, privacy.client_fingerprint(key, ip, user_agent))
            ledger.record_opt_out(engine, link.public_id, link.topic, origin)
        except (UnknownSubscriber, UnknownTopic):
            return self.page(400, lang)
        except (OperationalError, PoolTimeout) as err:
            # a lost or locked database is a passing condition: the provider retries
            log.warning("database unavailable: %s", type(err).__name__)
            return self.page(503, lang, [("Retry-After", UNAVAILABLE_RETRY_AFTER)])
        return self.page(200, lang)

    def limited(self, token: str, key: bytes | None = None) -> int | None:
        """Count one request to the link ``token``; return the seconds to wait when over its limit.

        A limit storage that fails turns nobody away: the request is let through, and said so.
        """
        if not limiter.enabled:
            return None
        identity = (*NAMESPACE, ratelimit.token_key(key or self.database()[1], token))
        try:
            strategy = FixedWindowRateLimiter(limiter.storage)
            for item in self.limits:
                if not strategy.hit(item, *identity):
                    reset = strategy.get_window_stats(item, *identity).reset_time
                    return max(1, int(reset - time.time()))
        except Exception:
            log.warning("rate limit storage unreachable: one-click let through")
        return None

    def page(self, status: int, lang: str, extra: Iterable[tuple[str, str]] = ()) -> Answer:
        """Return the page for ``status`` in ``lang`` (the default language when it has none)."""
        body = self.pages.get((status, lang)) or self.pages[(status, i18n.DEFAULT)]
        headers = [
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *SECURITY_HEADERS.items(),
            ("Cache-Control", "no-store"),
            *extra,
        ]
        return Answer(status, headers, body)

    def database(self) -> tuple[Engine, bytes]:
        """Return the app's engine and fingerprint key: looked up on first use, then kept.

        Neither changes while the app runs (the key is made once per database); with both at
        hand a one-click needs no app context, no session and no teardown.
        """
        if self._database is None:
            with self.app.app_context():
                self._database = (db.engine, privacy.fingerprint_key(session()))
        return self._database


def _render(app: Flask, status: int, lang: str) -> bytes:
    """Render a one-click page: the same for every link, so it carries no token and no switch.

    Rendered from the template alone, without the pages' context processor, whose language
    switch would load every language's locale data into each worker at start.
    """
    from .public import stylesheet_url

    # a request of its own for url_for and the language (werkzeug's builder: flask.testing would
    # bring click's test runner, and pdb, into every worker)
    environ = EnvironBuilder(base_url=app.config["BASE_URL"]).get_environ()
    with app.request_context(environ), force_locale(lang):
        page: dict[str, Any] = {
            "brand_name": app.config["BRAND_NAME"],
            "stylesheet_url": stylesheet_url(),
            "lang": lang,
            "chosen_lang": None,
            "languages": [],
        }
        if status == 200:
            name = "one_click.html"
        elif status == 400:
            name = "invalid_link.html"
        else:
            name = "error.html"
            page["status"] = status
            page["title"], page["message"] = i18n.error_text(status) or (REASONS[status], "")
        return app.jinja_env.get_template(name).render(page).encode()


def answerer() -> OneClick:
    """Return the current app's one-click answerer."""
    one_click: OneClick = current_app.extensions[EXTENSION]
    return one_click


class FastPath:
    """WSGI middleware: answer plain one-click POSTs with ``OneClick``, hand the rest to Flask."""

    def __init__(self, app: Flask, wsgi_app: WSGIApplication) -> None:
        self.app = app
        self.wsgi_app = wsgi_app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        token = _one_click_token(environ)
        if token is None or not hosts.serves(environ, self.app.config["ALLOWED_HOSTS"]):
            return self.wsgi_app(environ, start_response)
        one_click: OneClick = self.app.extensions[EXTENSION]
        started = time.perf_counter()
        body = environ["wsgi.input"].read(len(BODY))
        if body != BODY:
            environ["wsgi.input"] = io.BytesIO(body)  # the view reads it again
            return self.wsgi_app(environ, start_response)
        lang = i18n.accepted_language(environ.get("HTTP_ACCEPT_LANGUAGE"))
        try:
            answer = one_click.answer(token, environ.get("REMOTE_ADDR"), environ.get("HTTP_USER_AGENT"), lang)
        except Exception:
            log.exception("unexpected error on POST %s", ROUTE)
            answer = one_click.page(500, lang)
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        monitoring.observe(ROUTE, "POST", answer.status, time.perf_counter() - started, rid)
        environ[monitoring.LOGGED] = True  # gunicorn writes no second access line
        start_response(f"{answer.status} {REASONS[answer.status]}", [*answer.headers, ("X-Request-ID", rid)])
        return [answer.body]


def _one_click_token(environ: WSGIEnvironment) -> str | None:
    """Return the token of a plain one-click POST (RFC 8058's form, nothing else), or None."""
    path: str = environ.get("PATH_INFO", "")
    if (
        environ.get("REQUEST_METHOD") != "POST"
        or not path.startswith(PREFIX)
        or environ.get("QUERY_STRING")
        or environ.get("CONTENT_LENGTH") != str(len(BODY))
        or environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower() != FORM
    ):
        return None
    token = path[len(PREFIX) :]
    return token if token and "/" not in token else None


def install(app: Flask) -> None:
    """Put the fast path beneath the app's WSGI callable, inside any proxy fix added after it."""
    app.wsgi_app = FastPath(app, app.wsgi_app)  # type: ignore[method-assign]


def ready(app: Flask) -> None:
    """Make the app's one-click answerer, once its templates, tokens and limits are in place."""
    app.extensions[EXTENSION] = OneClick(app)
