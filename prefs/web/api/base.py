"""The API's blueprint and what every route shares: keys and their scopes, limits, the error shape."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from flask_limiter import RateLimitExceeded
from marshmallow import Schema, ValidationError
from werkzeug.routing import PathConverter

from ...domain import inbound
from ...domain import keys as api_keys
from ...errors import (
    Conflict,
    DomainError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidAddress,
    InvalidToken,
    InvalidValue,
    UnknownRequest,
    UnknownSubscriber,
    UnknownTopic,
)
from ...extensions import limiter, session
from ..responses import json_error

bp = Blueprint("api", __name__, url_prefix="/api/v1")


class AddressConverter(PathConverter):
    """The rest of the path, whatever it holds: an address may begin with "/" or hold "//"."""

    regex = ".+"
    part_isolating = False


@bp.record_once
def _converters(state: BlueprintSetupState) -> None:
    state.app.url_map.converters["address"] = AddressConverter


log = logging.getLogger(__name__)


F = TypeVar("F", bound=Callable[..., Any])


def requires(scope: str) -> Callable[[F], F]:
    """Let the view run only for a live key that has ``scope``."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kind, _, secret = request.headers.get("Authorization", "").partition(" ")
            key = api_keys.authenticate(session(), secret.strip()) if kind.lower() == "bearer" else None
            if key is None:
                response = json_error(
                    401, "unauthorized", "a valid API key is needed: Authorization: Bearer <key>"
                )
                return (*response, {"WWW-Authenticate": 'Bearer realm="prefs"'})
            if scope not in api_keys.scopes_of(key):
                return json_error(403, "forbidden", f"this key lacks the {scope!r} scope")
            g.api_key_name, g.api_key_id = key.name, key.id
            # counted per key once the key is known: a stranger cannot spend a mailer's limit
            with limiter.limit(_key_limit, key_func=_limit_key, scope="api-key"):
                return view(*args, **kwargs)

        wrapper.scope = scope  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def _key_limit() -> str:
    limit: str = current_app.config["RATELIMIT_API_KEY"]
    return limit


def _limit_key() -> str:
    return "api-key:" + str(g.api_key_name)


@bp.errorhandler(RateLimitExceeded)
def too_many_requests(err: RateLimitExceeded) -> Any:
    """Answer a key over its limit, and say when to come back."""
    limit = limiter.current_limit
    retry_after = max(1, int(limit.reset_at - time.time())) if limit else 60
    body, status = json_error(429, "rate_limited", f"this key is over its limit ({err.description})")
    return body, status, {"Retry-After": str(retry_after)}


def json_body(schema: Schema) -> Any:
    """Load the JSON body with ``schema``: 415, 400 and 422 as the API promises."""
    if request.mimetype != "application/json":
        raise Problem(415, "unsupported_media_type", "send the body as application/json")
    raw = request.get_data(cache=False)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise Problem(400, "malformed_json", "the body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise Problem(422, "validation_failed", "the body must be a JSON object")
    return schema.load(data)


def query(schema: Schema) -> Any:
    """Load the query string with ``schema``."""
    return schema.load(request.args.to_dict())


class Problem(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@bp.errorhandler(Problem)
def problem(err: Problem) -> Any:
    return json_error(err.status, err.code, err.message)


@bp.errorhandler(ValidationError)
def invalid(err: ValidationError) -> Any:
    failing = err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}
    return json_error(422, "validation_failed", "some fields are not valid", failing)


@bp.errorhandler(DomainError)
def domain_error(err: DomainError) -> Any:
    status = {
        UnknownSubscriber: 404,
        UnknownRequest: 404,
        Conflict: 409,
        InvalidValue: 422,
        InvalidAddress: 422,
        UnknownTopic: 422,
        InvalidToken: 422,
        inbound.InvalidMessage: 400,
        inbound.MessageTooLarge: 413,
        IdempotencyKeyReused: 422,
        IdempotencyKeyInUse: 409,
    }.get(type(err), 422)
    return json_error(status, err.code, str(err))


def json_response(body: Any, status: int = 200) -> Response:
    # the check answers thousands of results: skip Flask's sorted, indented encoder
    return Response(dumps(body), status, mimetype="application/json")


def dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"))
