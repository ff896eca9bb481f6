"""RFC 8058 one-click POSTs, answered beneath Flask's request machinery.

After a campaign, mailbox providers post ``List-Unsubscribe=One-Click`` to its links in
bursts. For that request Flask's request and app contexts, its hooks, the request's
session and Flask-Limiter's per-request resolution of the route's limits cost as much as
the opt-out itself: in process 1.2 ms of CPU a request through the view, 0.6 ms here
(benchmarks/ measures the one-click figure over HTTP). This layer answers exactly that
request, ``POST /u/<token>`` with no query and the form body RFC 8058 prescribes, with
the steps the view takes, and with no app context: it keeps the app's engine and
fingerprint key once it has looked them up, and the group commit writes on a connection
of its own.

- it answers only for a host the view answers for (``hosts.py``);
- it verifies the link (``Tokens.read_unsubscribe``);
- it counts the link against the view's rate limit, in Flask-Limiter's own storage under
  the key the view's limit uses, so both count the same link together;
- it records the opt-out with ``ledger.record_opt_out``, committed before the 200;
- it answers the page the view rendered for that language, with the view's headers, and
  logs and times the request as every other is.

Every other request, and any one-click it does not answer with a 200 (a link that does
not verify, a limit reached, a language whose page the view has not rendered yet, any
error at all), goes on to Flask as it came, its body included: the view then answers it,
pages and errors alike. A database fault (what the app answers 503) goes with it, and the
view answers that without writing again: the write has waited out its busy timeout, or
found the database away, once already. After any other error the view writes again;
recording an opt-out a second time changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flask import current_app, has_app_context
from limits import RateLimitItem, parse_many
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from . import hosts, i18n, ledger, monitoring, privacy, ratelimit
from .errors import InvalidToken
from .extensions import RATELIMIT_KEY_PREFIX, db, limiter, session
from .logs import request_id
from .public import (
    ONE_CLICK,
    ONE_CLICK_FAULT,
    ONE_CLICK_PAGES,
    ONE_CLICK_ROUTE,
    ONE_CLICK_SCOPE,
    SECURITY_HEADERS,
    client_origin,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

ROUTE = ONE_CLICK_ROUTE
PREFIX = ROUTE.partition("<")[0]
ENDPOINT = "public.unsubscribe"
# the view's limit counts under endpoint:scope (Flask-Limiter's layout)
LIMIT_SCOPE = f"{ENDPOINT}:{ONE_CLICK_SCOPE}"
BODY = f"List-Unsubscribe={ONE_CLICK}".encode()
FORM = "application/x-www-form-urlencoded"
# the view's headers (public.security_headers): a test holds the two answers equal
HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    *SECURITY_HEADERS.items(),
    ("Cache-Control", "no-store"),
]


class OneClick:
    """WSGI middleware: answer plain one-click POSTs, hand everything else to ``wsgi_app``."""

    def __init__(self, app: Flask, wsgi_app: WSGIApplication) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self._found: tuple[Engine, bytes] | None = None

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        token = _one_click_token(environ)
        if token is not None:
            started = time.perf_counter()
            body = environ["wsgi.input"].read(len(BODY))
            environ["wsgi.input"] = io.BytesIO(body)  # whoever answers reads it again
            if body == BODY:
                answer = self._answer(environ, token, started)
                if answer is not None:
                    headers, page = answer
                    start_response("200 OK", headers)
                    return [page]
        return self.wsgi_app(environ, start_response)

    def _answer(
        self, environ: WSGIEnvironment, token: str, started: float
    ) -> tuple[list[tuple[str, str]], bytes] | None:
        """Record the opt-out and return the headers and page, or None to hand it on."""
        if not hosts.serves(environ, self.app.config["ALLOWED_HOSTS"]):
            return None  # the view refuses it
        pages: dict[str, str] = self.app.extensions.get(ONE_CLICK_PAGES, {})
        page = pages.get(i18n.accepted_language(environ.get("HTTP_ACCEPT_LANGUAGE")))
        if page is None:
            return None  # the view renders and keeps it
        try:
            link = self.app.extensions["prefs.tokens"].read_unsubscribe(token)
        except InvalidToken:
            return None
        try:
            engine, key = self._database()
            if not self._within_limit(key, token):
                return None
            origin = client_origin(
                key, "one-click", link.campaign, environ.get("REMOTE_ADDR"), environ.get("HTTP_USER_AGENT")
            )
            ledger.record_opt_out(engine, link.public_id, link.topic, origin)
        except (OperationalError, PoolTimeout) as err:
            log.info("one-click handed to the view after %s", type(err).__name__)
            environ[ONE_CLICK_FAULT] = err
            return None
        except Exception as err:  # the view meets the same fault and answers it
            log.info("one-click handed to the view after %s", type(err).__name__)
            return None
        rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
        monitoring.observe(ROUTE, "POST", 200, time.perf_counter() - started, rid)
        environ[monitoring.LOGGED] = True
        data = page.encode()
        return [*HEADERS, ("Content-Length", str(len(data))), ("X-Request-ID", rid)], data

    def _database(self) -> tuple[Engine, bytes]:
        """Return the app's engine and fingerprint key: looked up once, then kept.

        Neither changes while the app runs (the key is made once per database), and with
        both at hand a one-click needs no app context, no session and no teardown.
        """
        if self._found is None:
            with self._app_context():
                self._found = (db.engine, privacy.fingerprint_key(session()))
        return self._found

    def _app_context(self) -> contextlib.AbstractContextManager[Any]:
        # as Flask's request does: join this app's context when one is pushed already
        if has_app_context() and current_app._get_current_object() is self.app:  # type: ignore[attr-defined]
            return contextlib.nullcontext()
        return self.app.app_context()

    def _within_limit(self, fingerprint_key: bytes, token: str) -> bool:
        """Count this link against the view's one-click limit; tell whether it is within it."""
        if not limiter.enabled:
            return True
        # the key the view's limit uses: Flask-Limiter's prefix, the link's key, the scope
        key = (RATELIMIT_KEY_PREFIX, ratelimit.token_key(fingerprint_key, token), LIMIT_SCOPE)
        try:
            # each limit in turn, stopping at the first reached, as Flask-Limiter does
            limits = _limits(self.app.config["RATELIMIT_ONE_CLICK"])
            return all(limiter.limiter.hit(item, *key) for item in limits)
        except Exception:  # as the limiter's swallow_errors: a storage outage turns nobody away
            log.warning("rate limit storage unreachable: one-click let through")
            return True


@functools.lru_cache(maxsize=8)
def _limits(spec: str) -> list[RateLimitItem]:
    return sorted(parse_many(spec))


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
    """Put the one-click layer beneath the app's WSGI callable (inside any proxy fix)."""
    app.wsgi_app = OneClick(app, app.wsgi_app)  # type: ignore[method-assign]
