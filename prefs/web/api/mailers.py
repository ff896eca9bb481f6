"""What mailers call: the check before a send, suppressions, the change feed, events and inbound mail."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from flask import Response, current_app, g, request
from marshmallow import ValidationError
from werkzeug.wsgi import wrap_file

from ...domain import campaigns, checks, exports, feeds, idempotency, inbound, ledger, topics
from ...domain.addresses import normalize
from ...domain.changes import Change, Origin
from ...errors import (
    Busy,
    DomainError,
    InvalidValue,
    UnknownTopic,
)
from ...extensions import session
from ...ops import metrics
from ..links import base_url, tokens
from ..responses import json_error
from . import schemas as s
from .base import Problem, bp, dumps, json_body, json_response, log, query, requires


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
    return json_response({"items": page.items, "next_cursor": page.next_cursor})


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
    return json_response(
        {"items": page.items, "next_cursor": page.next_cursor, "lag_seconds": page.lag_seconds}
    )


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
        return json_response({"results": _record_events(db, results, batch)})
    scope, request_hash = f"events:{g.api_key_id}", idempotency.request_digest(payload)
    answer = idempotency.kept(db, scope, key, request_hash)
    if answer is None:
        results, batch = _prepare_events(db, payload["events"])
        answer = idempotency.once(
            db,
            scope,
            key,
            request_hash,
            lambda: (200, dumps({"results": _record_events(db, results, batch)})),
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
    public_ids = checks.ensure_public_ids(db, {address for _, _, address in wanted})
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
        raise Problem(
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
        raise Problem(415, "unsupported_media_type", "send the raw message as message/rfc822")
    outcome = inbound.handle(
        session(),
        tokens(),
        request.get_data(cache=False),
        authserv_id=current_app.config.get("INBOUND_AUTHSERV_ID") or None,
        mailbox=current_app.config.get("UNSUBSCRIBE_MAILTO") or None,
    )
    return json_response({"action": outcome.action, "scope": outcome.scope, "reason": outcome.reason})
