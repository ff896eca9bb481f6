"""The mailer API under ``/api/v1``: parse, call the domain, answer in JSON."""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, g, request, stream_with_context
from flask_limiter import RateLimitExceeded
from marshmallow import Schema, ValidationError

from . import campaigns, checks, feeds, inbound, ledger, metrics, register, subjects, topics
from . import keys as api_keys
from . import schemas as s
from .addresses import normalize
from .errors import (
    Conflict,
    DomainError,
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
            g.api_key_name = key.name
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
    }.get(type(err), 422)
    return json_error(status, err.code, str(err))


def _json(body: Any, status: int = 200) -> Response:
    # the check answers thousands of results: skip Flask's sorted, indented encoder
    return Response(json.dumps(body, separators=(",", ":")), status, mimetype="application/json")


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
    """List, page by page or streamed whole, every address that may not receive a topic."""
    params = query(s.SuppressionQuery())
    topic = params.get("topic")
    try:
        kind = request.accept_mimetypes.best_match(
            ["application/json", "text/csv", "application/x-ndjson"], default="application/json"
        )
        if kind in ("text/csv", "application/x-ndjson"):
            batches = feeds.stream_suppressions(session(), topic)
            first = next(batches, None)  # an unknown topic fails here, before the 200
            return Response(stream_with_context(_stream(kind, first, batches)), mimetype=kind)
        page = feeds.suppression_page(session(), topic, params.get("cursor"), params["limit"])
    except UnknownTopic as err:
        raise ValidationError({"topic": [str(err)]}) from None
    except InvalidValue as err:
        raise ValidationError({"cursor": [str(err)]}) from None
    return _json({"items": page.items, "next_cursor": page.next_cursor})


def _stream(
    kind: str, first: list[feeds.Suppression] | None, batches: Iterator[list[feeds.Suppression]]
) -> Iterator[str]:
    if kind == "text/csv":
        yield "email,scope,reason,since\r\n"
    for batch in itertools.chain([first] if first else [], batches):
        if kind == "text/csv":
            yield _csv_lines(batch)
        else:
            yield "".join([json.dumps(feeds.as_item(row), separators=(",", ":")) + "\n" for row in batch])


# what a value needing quotes holds: a comma, quote or line break; or a leading formula sign
_CSV_SPECIAL = re.compile(r'[,"\r\n]')
_FORMULA = frozenset("=+-@")
_LINE_FORMULA = re.compile(r"\n[=+\-@]")


def _csv_lines(batch: list[feeds.Suppression]) -> str:
    """Return a batch as CSV lines; an address that needs quotes or a formula guard gets them."""
    plain = "".join(
        [f"{email},{scope},{reason or ''},{since or ''}\r\n" for email, scope, reason, since in batch]
    )
    # nearly every batch needs no quoting at all, and a few scans of its text prove it: each
    # line has its three commas and one line break, no quote, and no line starts a formula
    rows = len(batch)
    if (
        plain.count(",") == 3 * rows
        and plain.count("\n") == rows
        and plain.count("\r") == rows
        and '"' not in plain
        and plain[:1] not in _FORMULA
        and not _LINE_FORMULA.search(plain)
    ):
        return plain
    return "".join(
        [f"{_csv(email)},{scope},{reason or ''},{since or ''}\r\n" for email, scope, reason, since in batch]
    )


def _csv(value: str) -> str:
    # addresses may hold quotes or commas in a quoted local part; spreadsheet formulas too
    if value[:1] in _FORMULA or _CSV_SPECIAL.search(value):
        return '"' + value.replace('"', '""') + '"'
    return value


@bp.get("/changes")
@requires("read")
def changes() -> Response:
    """Return the changes to who may receive what, after a cursor, in a stable order."""
    params = query(s.ChangesQuery())
    try:
        page = feeds.change_page(session(), params.get("after"), params["limit"])
    except InvalidValue as err:
        raise ValidationError({"after": [str(err)]}) from None
    return _json({"items": page.items, "next_cursor": page.next_cursor})


_EVENT_ITEM = s.EventItem()


@bp.post("/events")
@requires("write")
def events() -> Response:
    """Record reported unsubscribes, re-subscriptions, complaints and hard bounces."""
    payload = json_body(s.EventsRequest())
    db = session()
    results: list[dict[str, Any] | None] = []
    wanted: list[tuple[int, dict[str, Any], str]] = []
    for index, item in enumerate(payload["events"]):
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
    for (index, _), changed in zip(batch, ledger.record_many(db, [c for _, c in batch]), strict=True):
        results[index] = {"status": "accepted", "changed": changed}
    return _json({"results": results})


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
    )
    return _json({"action": outcome.action, "scope": outcome.scope, "reason": outcome.reason})


@bp.get("/subscribers/<email>")
@requires("admin")
def subject(email: str) -> Response:
    """Return everything held about an address (an access request)."""
    return _json(subjects.export_subject(session(), _address(email)))


@bp.delete("/subscribers/<email>")
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
