"""What every response shares: one error shape per surface, and 503 when the database is away."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify, render_template, request
from sqlalchemy.exc import DataError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..extensions import db
from . import i18n

log = logging.getLogger(__name__)

API_PREFIX = "/api/"


def wants_json() -> bool:
    """Tell whether this request is the API's, which answers errors in JSON."""
    return request.path.startswith(API_PREFIX)


def json_error(
    status: int, code: str, message: str, fields: dict[str, Any] | None = None
) -> tuple[Response, int]:
    """Return the API's one error shape."""
    body: dict[str, Any] = {"code": code, "message": message}
    if fields:
        body["fields"] = fields
    return jsonify(error=body), status


def page_error(status: int, title: str, message: str, **context: Any) -> tuple[str, int]:
    """Return the friendly HTML error page."""
    return render_template("error.html", status=status, title=title, message=message, **context), status


def error_response(status: int, code: str, title: str, message: str) -> Any:
    """Answer an error in the shape of the surface that was called."""
    if wants_json():
        return json_error(status, code, message)
    # the page speaks the reader's language; werkzeug's own words are English only
    title, message = i18n.error_text(status) or (title, message)
    return page_error(status, title, message)


def read_body_first() -> None:
    """Read a request's body before any view takes a database connection.

    A client that trickles its body in then holds one thread and no pooled connection:
    without this, an API call authenticates (a read on a pooled connection) and only then
    reads the body, and a few slow clients starve every other request of connections.
    A body over ``PREFS_MAX_BODY_BYTES`` is refused (413): unread when its length is
    announced, read no further than the limit when it is not.
    """
    if not request.content_length and "Transfer-Encoding" not in request.headers:
        return
    data = request.get_data(cache=True)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # a body without a length (chunked) stops at the limit: werkzeug would hand on the
    # first PREFS_MAX_BODY_BYTES as if they were all, so look for one byte more
    if request.content_length is None and len(data) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def discard_session(err: BaseException | None = None) -> None:
    """End this context's session; a connection lost at the very end costs nothing.

    The closing rollback of a read is the request's last word with the database. When the
    database goes away after the answer is ready, that rollback fails: log it, drop the
    session's connections from the pool, and let the answer stand.
    """
    try:
        db.session.remove()
    except SQLAlchemyError as lost:
        log.warning("database connection lost while closing a session: %s", type(lost).__name__)
        with contextlib.suppress(SQLAlchemyError):
            db.session().invalidate()
        db.session.registry.clear()


def register(app: Flask) -> None:
    """Install the app-wide error handlers, and the session's end of every app context."""

    # runs before Flask-SQLAlchemy's own teardown (teardowns run last-registered first),
    # which then finds no session left to close
    app.teardown_appcontext(discard_session)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Any:
        status = err.code or 500
        code = (err.name or "error").lower().replace(" ", "_").replace("'", "")
        body, _ = error_response(status, code, err.name or "Error", err.description or "")
        # keep the headers werkzeug gives the status (Allow on 405, Retry-After on 429)
        headers = {k: v for k, v in err.get_headers() if k.lower() != "content-type"}
        return body, status, headers

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def database_unavailable(err: Exception) -> Any:
        # a lost or locked database is a passing condition: say so, never a stack trace
        discard_session()
        log.warning("database unavailable: %s", type(err).__name__)
        body, status = error_response(
            503,
            "unavailable",
            "Please try again in a moment",
            "The service is briefly unavailable. Nothing was changed; please try again.",
        )
        return body, status, {"Retry-After": "5"}

    @app.errorhandler(DataError)
    def refused_by_database(err: DataError) -> Any:
        # input the database cannot store (the checks before it should have caught it)
        discard_session()
        log.warning("database refused a value: %s", type(err.orig).__name__)
        return error_response(
            400, "invalid_input", "This request is not valid", "A value in the request is not valid."
        )

    @app.errorhandler(Exception)
    def unexpected(err: Exception) -> Any:
        if isinstance(err, HTTPException):
            return http_error(err)
        log.exception("unexpected error on %s %s", request.method, request.url_rule)
        discard_session()
        return error_response(
            500, "internal_error", "Something went wrong", "Something went wrong on our side."
        )
