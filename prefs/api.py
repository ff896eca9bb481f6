"""The mailer API under ``/api/v1``: parse, call the domain, answer in JSON."""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, g, request
from flask.blueprints import BlueprintSetupState
from flask_limiter import RateLimitExceeded
from marshmallow import Schema, ValidationError
from werkzeug.routing import PathConverter
from werkzeug.wsgi import wrap_file

from . import (
    campaigns,
    checks,
    exports,
    feeds,
    idempotency,
    inbound,
    ledger,
    metrics,
    register,
    subjects,
    topics,
)
from . import keys as api_keys
from . import schemas as s
from .addresses import normalize
from .errors import (
    Busy,
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
from .extensions import limiter, session
from .ledger import Change, Origin
from .links import base_url, tokens
from .web import json_error

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
        raise _Problem(415, "unsupported_media_type", "send the body as application/json")
    raw = request.get_data(cache=False)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise _Problem(400, "malformed_json", "the body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise _Problem(422, "validation_failed", "the body must be a JSON object")
    return schema.load(data)


def query(schema: Schema) -> Any:
    """Load the query string with ``schema``."""
    return schema.load(request.args.to_dict())


class _Problem(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@bp.errorhandler(_Problem)
def problem(err: _Problem) -> Any:
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


def _json(body: Any, status: int = 200) -> Response:
    # the check answers thousands of results: skip Flask's sorted, indented encoder
    return Response(_dumps(body), status, mimetype="application/json")


def _dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"))


@bp.post("/check")
@requires("send")
def check() -> Response:
    """Judge each recipient for a category and return links and headers for the allowed ones."""
    payload = json_body(s.CheckRequest())
    try:
        answers = checks.check_recipients(
            session(), tokens(), payload["topic"], payload["recipients"], payload.get("campaign")
        )
    except UnknownTopic as err:
        raise ValidationError({"topic": [str(err)]}) from None
    reasons = Counter(answer.reason for _, answer in answers)
    metrics.count_check(payload["topic"], len(answers), reasons)
    # the denominator of each campaign's unsubscribe rate
    campaigns.count_sent(session(), payload.get("campaign"), payload["topic"], reasons[None])
    body = s.render_check(answers, base_url(), current_app.config["UNSUBSCRIBE_MAILTO"])
    return Response(body, mimetype="application/json")


@bp.get("/suppressions")
@requires("read")
def suppressions() -> Any:
    """List, page by page or exported whole, every address that may not receive a topic."""
    params = query(s.SuppressionQuery())
    topic = params.get("topic")
    try:
        kind = request.accept_mimetypes.best_match(
            ["application/json", *exports.FORMATS], default="application/json"
        )
        if kind in exports.FORMATS:
            return _export(topic, kind, params["spreadsheet"])
        page = feeds.suppression_page(session(), topic, params.get("cursor"), params["limit"])
    except UnknownTopic as err:
        raise ValidationError({"topic": [str(err)]}) from None
    except InvalidValue as err:
        raise ValidationError({"cursor": [str(err)]}) from None
    return _json({"items": page.items, "next_cursor": page.next_cursor})


def _export(topic: str | None, kind: str, spreadsheet: bool) -> Any:
    try:
        export = exports.export_suppressions(session(), topic, kind, spreadsheet)
    except (OSError, Busy) as err:  # no room for the file, or no turn to read: nothing is sent
        log.warning("export not prepared: %s", type(err).__name__)
        error, status = json_error(503, "unavailable", "the export could not be prepared; try again later")
        return error, status, {"Retry-After": "60"}
    headers = {"X-Total-Count": str(export.rows), "Content-Length": str(export.size)}
    # the WSGI server sends the file itself (sendfile under gunicorn) and closes it
    body = wrap_file(request.environ, export.file, buffer_size=1 << 16)
    return Response(body, mimetype=kind, headers=headers, direct_passthrough=True)


@bp.get("/changes")
@requires("read")
def changes() -> Response:
    """Return the changes to who may receive what, after a cursor, in a stable order."""
    params = query(s.ChangesQuery())
    try:
        page = feeds.change_page(session(), params.get("after"), params["limit"])
    except InvalidValue as err:
        raise ValidationError({"after": [str(err)]}) from None
    return _json({"items": page.items, "next_cursor": page.next_cursor, "lag_seconds": page.lag_seconds})


_EVENT_ITEM = s.EventItem()


@bp.post("/events")
@requires("write")
def events() -> Response:
    """Record reported unsubscribes, re-subscriptions, complaints and hard bounces.

    With an ``Idempotency-Key``, a request sent again (its answer lost) gets the first
    answer, and records nothing more.
    """
    payload = json_body(s.EventsRequest())
    db = session()
    key = _idempotency_key()
    if key is None:
        results, batch = _prepare_events(db, payload["events"])
        return _json({"results": _record_events(db, results, batch)})
    scope, request_hash = f"events:{g.api_key_id}", idempotency.request_digest(payload)
    answer = idempotency.kept(db, scope, key, request_hash)
    if answer is None:
        results, batch = _prepare_events(db, payload["events"])
        answer = idempotency.once(
            db,
            scope,
            key,
            request_hash,
            lambda: (200, _dumps({"results": _record_events(db, results, batch)})),
        )
    response = Response(answer.body, answer.status, mimetype="application/json")
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _prepare_events(
    db: Any, items: list[dict[str, Any]]
) -> tuple[list[dict[str, Any] | None], list[tuple[int, Change]]]:
    """Check each event and find or create its subscriber; return the results so far and the changes."""
    results: list[dict[str, Any] | None] = []
    wanted: list[tuple[int, dict[str, Any], str]] = []
    for index, item in enumerate(items):
        try:
            event = _EVENT_ITEM.load(item)
            address = normalize(event["email"])
            if event.get("topic") is not None and event["type"] in ("unsubscribe", "resubscribe"):
                topics.get_topic(db, event["topic"])
        except ValidationError as err:
            results.append(_item_error("validation_failed", "the event is not valid", err.messages))
            continue
        except DomainError as err:
            results.append(_item_error(err.code, str(err)))
            continue
        results.append(None)
        wanted.append((index, event, address))
    public_ids = checks.public_ids(db, {address for _, _, address in wanted})
    batch: list[tuple[int, Change]] = []
    for index, event, address in wanted:
        public_id = public_ids.get(address)
        if public_id is None:  # erased: out of all marketing already
            results[index] = (
                _item_error("erased", "this address was erased")
                if event["type"] == "resubscribe"
                else {"status": "accepted", "changed": False}
            )
            continue
        batch.append((index, _change(public_id, event)))
    return results, batch


def _record_events(
    db: Any, prepared: list[dict[str, Any] | None], batch: list[tuple[int, Change]]
) -> list[dict[str, Any] | None]:
    """Record the changes in one transaction; return every event's result."""
    results = list(prepared)
    for (index, _), recorded in zip(batch, ledger.record_many(db, [c for _, c in batch]), strict=True):
        answer: dict[str, Any] = {"status": "accepted", "changed": recorded.changed}
        if recorded.kept_out is not None:
            # a resubscribe the rule does not let this source make: what still keeps it out
            answer["reason"] = recorded.kept_out
        results[index] = answer
    return results


# RFC 8941's sf-string, as the IETF draft writes the header, or the bare token most APIs take
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}\Z")


def _idempotency_key() -> str | None:
    """Return the request's ``Idempotency-Key``, if any; 400 for one that is not 1-255 printable ASCII."""
    value = request.headers.get("Idempotency-Key")
    if value is None:
        return None
    value = value.strip(" \t")
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = re.sub(r"\\([\\\"])", r"\1", value[1:-1])
    if not _IDEMPOTENCY_KEY.match(value) or not value.strip():
        raise _Problem(
            400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 printable ASCII characters"
        )
    return value


def _change(public_id: str, event: dict[str, Any]) -> Change:
    origin = Origin("api", campaign=event.get("campaign"), at=event.get("at"))
    kind = event["type"]
    if kind == "complaint":
        return Change(public_id, None, False, origin, "complained")
    if kind == "hard_bounce":
        return Change(public_id, None, False, origin, "bounced")
    return Change(public_id, event.get("topic"), kind == "resubscribe", origin)


def _item_error(code: str, message: str, failing: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if failing:
        error["fields"] = failing if isinstance(failing, dict) else {"_schema": failing}
    return {"status": "error", "error": error}


@bp.post("/inbound")
@requires("write")
def inbound_mail() -> Response:
    """Honour a raw message sent to the unsubscribe address."""
    if request.mimetype != "message/rfc822":
        raise _Problem(415, "unsupported_media_type", "send the raw message as message/rfc822")
    outcome = inbound.handle(
        session(),
        tokens(),
        request.get_data(cache=False),
        authserv_id=current_app.config.get("INBOUND_AUTHSERV_ID") or None,
        mailbox=current_app.config.get("UNSUBSCRIBE_MAILTO") or None,
    )
    return _json({"action": outcome.action, "scope": outcome.scope, "reason": outcome.reason})


# an address may hold "/" (``a/b@example.com``): the rest of the path is the address, as
# sent (%2F decoded), its slashes never merged (a redirect would put it in a Location)
SUBJECT = "/subscribers/<address:email>"


@bp.get(SUBJECT, merge_slashes=False)
@requires("admin")
def subject(email: str) -> Response:
    """Return everything held about an address (an access request)."""
    return _json(subjects.export_subject(session(), _address(email)))


@bp.delete(SUBJECT, merge_slashes=False)
@requires("admin")
def erase(email: str) -> Response:
    """Erase an address, keeping only a fingerprint that keeps it out of marketing."""
    subjects.erase_subject(session(), _address(email))
    return Response(status=204)


def _address(email: str) -> str:
    try:
        return normalize(email)
    except InvalidAddress:
        # a malformed address names nobody on file
        raise UnknownSubscriber("nothing is held about this address") from None


@bp.get("/topics")
@requires("admin")
def topic_list() -> Response:
    """List the topics, archived ones too."""
    return _json({"topics": [s.topic_body(t) for t in topics.list_topics(session())]})


@bp.post("/topics")
@requires("admin")
def topic_create() -> Response:
    """Create a topic."""
    payload = json_body(s.TopicCreate())
    try:
        topic = topics.create_topic(
            session(), payload["key"], payload["name"], payload["description"], payload["default"] == "opt-in"
        )
    except InvalidValue as err:
        raise ValidationError({"key": [str(err)]}) from None
    return _json(s.topic_body(topic), 201)


@bp.patch("/topics/<key>")
@requires("admin")
def topic_update(key: str) -> Response:
    """Change a topic's name, description or archived flag."""
    payload = json_body(s.TopicPatch())
    try:
        topic = topics.update_topic(session(), key, **payload)
    except UnknownTopic as err:
        return json_error(404, err.code, str(err))  # type: ignore[return-value]
    return _json(s.topic_body(topic))


@bp.post("/requests")
@requires("admin")
def request_create() -> Response:
    """Record an access, rectification, erasure or objection request, due in 30 days."""
    payload = json_body(s.RequestCreate())
    try:
        item = register.record_request(
            session(), payload["type"], payload["email"], payload.get("received_at"), payload["note"]
        )
    except InvalidAddress as err:
        raise ValidationError({"email": [str(err)]}) from None
    except InvalidValue as err:
        raise ValidationError({"received_at": [str(err)]}) from None
    return _json(s.request_body(item), 201)


@bp.get("/requests")
@requires("admin")
def request_list() -> Response:
    """List the open (overdue first), overdue or done requests, a keyset page at a time."""
    params = query(s.RequestQuery())
    try:
        page = register.request_page(session(), params["status"], params.get("cursor"), params["limit"])
    except InvalidValue as err:
        raise ValidationError({"cursor": [str(err)]}) from None
    return _json({"items": [s.request_body(item) for item in page.items], "next_cursor": page.next_cursor})


@bp.post("/requests/<int:request_id>/complete")
@requires("admin")
def request_complete(request_id: int) -> Response:
    """Act on a request and close it: attach the export, erase, or take the address out."""
    payload = json_body(s.RequestComplete()) if request.content_length else {}
    done = register.complete_request(session(), request_id, note=payload.get("note"))
    body = s.request_body(done.request)
    if done.export is not None:
        body["export"] = done.export
    return _json(body)


@bp.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI 3 document of this API."""
    from .openapi import document

    return _json(document(base_url()))
