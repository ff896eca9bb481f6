"""The API's marshmallow schemas: ``load()`` in the views, and the source of the OpenAPI document."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from datetime import UTC
from typing import Any

from marshmallow import Schema, fields, validate

from ...domain.rules import REASONS
from ...domain.tokens import CAMPAIGN
from ...domain.topics import KEY
from .fields import Pattern, Recipients, Text, UTCTime

_campaign = Pattern(CAMPAIGN, "1 to 64 letters, digits or . _ ~ -")
_topic_key = Pattern(KEY, "1 to 64 lower-case letters, digits, '-' or '_'")

MAX_EVENTS = 1000
MAX_PAGE = 10_000


class ErrorBody(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    failing = fields.Dict(keys=fields.String(), data_key="fields")


class Error(Schema):
    error = fields.Nested(ErrorBody, required=True)


class CheckRequest(Schema):
    topic = Text(required=True, validate=validate.Length(1, 64))
    campaign = Text(validate=_campaign)
    recipients = Recipients(required=True)


class Headers(Schema):
    class Meta:
        ordered = True

    list_unsubscribe = fields.String(data_key="List-Unsubscribe", required=True)
    list_unsubscribe_post = fields.String(data_key="List-Unsubscribe-Post", required=True)


class CheckResult(Schema):
    email = fields.String(required=True)
    allowed = fields.Boolean(required=True)
    reason = fields.String(required=True, allow_none=True, validate=validate.OneOf(REASONS))
    unsubscribe_url = fields.String(required=True, allow_none=True)
    preferences_url = fields.String(required=True, allow_none=True)
    headers = fields.Nested(Headers, required=True, allow_none=True)
    warnings = fields.List(fields.String(validate=validate.OneOf(["hard_bounce"])))


class CheckResponse(Schema):
    results = fields.List(fields.Nested(CheckResult), required=True)


ONE_CLICK = "List-Unsubscribe=One-Click"


RENDER_CHUNK = 500


def render_check(answers: Iterable[Any], base_url: str, mailto: str | None) -> list[bytes]:
    """Return the check's response body, exactly as ``CheckResponse`` describes it.

    Written out by hand: marshmallow's dump costs more than the whole check for 10,000
    results.  Tokens are URL-safe ASCII; the given addresses and the settings are escaped.
    The body comes as encoded pieces of ``RENDER_CHUNK`` results (Werkzeug adds up their
    lengths for Content-Length): no whole copy of a 4 MB answer is made, in text or in bytes.
    """
    rendered = _results(
        answers, _text(base_url), _text(f"mailto:{mailto}?subject=unsubscribe-") if mailto else None
    )
    body = [b'{"results":[']
    while chunk := list(itertools.islice(rendered, RENDER_CHUNK)):
        if len(body) > 1:
            body.append(b",")
        body.append(",".join(chunk).encode())
    body.append(b"]}")
    return body


def _results(answers: Iterable[Any], base: str, mail: str | None) -> Iterator[str]:
    for email, (allowed, reason, token, preferences, hard_bounce) in answers:
        start = '{"email":' + _text_quoted(email)
        if not allowed:
            yield (
                f'{start},"allowed":false,"reason":"{reason}",'
                '"unsubscribe_url":null,"preferences_url":null,"headers":null}'
            )
        elif token is None:
            link = f'"{base}/p/{preferences}"' if preferences else "null"
            warn = ',"warnings":["hard_bounce"]' if hard_bounce else ""
            yield (
                f'{start},"allowed":true,"reason":null,"unsubscribe_url":null,'
                f'"preferences_url":{link},"headers":null{warn}}}'
            )
        else:
            url = f"{base}/u/{token}"
            header = f"<{url}>, <{mail}{token}>" if mail else f"<{url}>"
            yield (
                f'{start},"allowed":true,"reason":null,"unsubscribe_url":"{url}",'
                f'"preferences_url":"{base}/p/{preferences}",'
                f'"headers":{{"List-Unsubscribe":"{header}","List-Unsubscribe-Post":"{ONE_CLICK}"}}}}'
            )


_text_quoted = json.encoder.encode_basestring_ascii


def _text(value: str) -> str:
    return str(_text_quoted(value))[1:-1]


class PageQuery(Schema):
    limit = fields.Integer(load_default=1000, validate=validate.Range(1, MAX_PAGE))


class SuppressionQuery(PageQuery):
    topic = Text(validate=_topic_key)
    cursor = Text(validate=validate.Length(1, 64))
    spreadsheet = fields.Boolean(
        load_default=False,
        metadata={"description": "CSV only: begin each cell a spreadsheet would run as a formula with '"},
    )


class Suppression(Schema):
    email = fields.String(required=True)
    scope = fields.String(required=True)
    reason = fields.String(required=True, allow_none=True)
    since = fields.String(required=True, allow_none=True, metadata={"format": "date-time"})


class SuppressionPage(Schema):
    items = fields.List(fields.Nested(Suppression), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class ChangesQuery(PageQuery):
    after = Text(validate=validate.Length(1, 64))


class ChangeItem(Schema):
    email = fields.String(required=True)
    change = fields.String(required=True, validate=validate.OneOf(["suppressed", "unsuppressed"]))
    scope = fields.String(required=True)
    reason = fields.String(required=True, allow_none=True)
    at = fields.String(required=True, metadata={"format": "date-time"})


class ChangesPage(Schema):
    items = fields.List(fields.Nested(ChangeItem), required=True)
    next_cursor = fields.String(required=True)
    lag_seconds = fields.Float(
        required=True,
        metadata={
            "description": "How long changes committed since have waited behind the oldest write still"
            " open (0 when none waits): the feed shows a change only once every write begun before it"
            " has ended, so that none is ever skipped"
        },
    )


EVENT_TYPES = ("unsubscribe", "resubscribe", "complaint", "hard_bounce")


class EventItem(Schema):
    type = Text(required=True, validate=validate.OneOf(EVENT_TYPES))
    email = Text(required=True, validate=validate.Length(1, 1000))
    topic = Text(validate=_topic_key)
    campaign = Text(validate=_campaign)
    at = UTCTime()


class EventsRequest(Schema):
    # each event is loaded (and answered) on its own, with EventItem: the document says so
    events = fields.List(fields.Dict(), required=True, validate=validate.Length(1, MAX_EVENTS))


class EventResult(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["accepted", "error"]))
    changed = fields.Boolean()
    reason = fields.String(
        validate=validate.OneOf(["complained", "bounced"]),
        metadata={
            "description": "a resubscribe this key may not make: what still keeps the address out"
            " (a complaint is lifted only by the person in the preference center)"
        },
    )
    error = fields.Nested(ErrorBody)


class EventsResponse(Schema):
    results = fields.List(fields.Nested(EventResult), required=True)


class InboundResult(Schema):
    action = fields.String(
        required=True, validate=validate.OneOf(["unsubscribed", "already_unsubscribed", "ignored"])
    )
    scope = fields.String(required=True, allow_none=True)
    reason = fields.String(required=True)


class TopicItem(Schema):
    key = fields.String(required=True)
    name = fields.String(required=True)
    description = fields.String(required=True)
    default = fields.String(required=True, validate=validate.OneOf(["opt-out", "opt-in"]))
    archived = fields.Boolean(required=True)


class TopicList(Schema):
    topics = fields.List(fields.Nested(TopicItem), required=True)


class TopicCreate(Schema):
    key = Text(required=True, validate=validate.Length(1, 64))
    name = Text(required=True, validate=validate.Length(1, 200))
    description = Text(load_default="", validate=validate.Length(0, 2000))
    default = Text(load_default="opt-out", validate=validate.OneOf(["opt-out", "opt-in"]))


class TopicPatch(Schema):
    name = Text(validate=validate.Length(1, 200))
    description = Text(validate=validate.Length(0, 2000))
    archived = fields.Boolean()


class SubjectSubscriber(Schema):
    email = fields.String(required=True)
    public_id = fields.String(required=True)
    created_at = fields.String(required=True)
    left_all_marketing = fields.Boolean(required=True)
    left_all_reason = fields.String(required=True, allow_none=True)
    left_all_at = fields.String(required=True, allow_none=True)
    hard_bounce_at = fields.String(required=True, allow_none=True)


class SubjectPreference(Schema):
    topic = fields.String(required=True)
    subscribed = fields.Boolean(required=True)
    source = fields.String(required=True)
    updated_at = fields.String(required=True)


class SubjectEvent(Schema):
    action = fields.String(required=True)
    topic = fields.String(required=True, allow_none=True)
    reason = fields.String(required=True, allow_none=True)
    source = fields.String(required=True)
    campaign = fields.String(required=True, allow_none=True)
    client_fingerprint = fields.String(required=True, allow_none=True)
    at = fields.String(required=True)


class SubjectRequest(Schema):
    type = fields.String(required=True)
    received_at = fields.String(required=True)
    due_at = fields.String(required=True)
    completed_at = fields.String(required=True, allow_none=True)


class Subject(Schema):
    subscriber = fields.Nested(SubjectSubscriber, required=True)
    preferences = fields.List(fields.Nested(SubjectPreference), required=True)
    events = fields.List(fields.Nested(SubjectEvent), required=True)
    requests = fields.List(fields.Nested(SubjectRequest), required=True)


def topic_body(topic: Any) -> dict[str, Any]:
    """Return a topic as the API shows it."""
    body: dict[str, Any] = TopicItem().dump(
        {
            "key": topic.key,
            "name": topic.name,
            "description": topic.description,
            "default": "opt-in" if topic.opt_in else "opt-out",
            "archived": topic.archived,
        }
    )
    return body


REQUEST_TYPES = ("access", "rectification", "erasure", "objection")


class RequestCreate(Schema):
    type = Text(required=True, validate=validate.OneOf(REQUEST_TYPES))
    email = Text(required=True, validate=validate.Length(1, 1000))
    received_at = UTCTime()
    note = Text(load_default="", validate=validate.Length(0, 2000))


class RequestComplete(Schema):
    note = Text(validate=validate.Length(0, 2000))


class RequestQuery(PageQuery):
    status = Text(load_default="open", validate=validate.OneOf(["open", "overdue", "done"]))
    cursor = Text(validate=validate.Length(1, 200))


class RequestItem(Schema):
    id = fields.Integer(required=True)
    type = fields.String(required=True, validate=validate.OneOf(REQUEST_TYPES))
    subject = fields.String(required=True, metadata={"description": "the masked address, or 'erased'"})
    received_at = fields.String(required=True)
    due_at = fields.String(required=True)
    completed_at = fields.String(required=True, allow_none=True)
    outcome = fields.String(required=True, allow_none=True)
    overdue = fields.Boolean(required=True)
    note = fields.String(required=True)
    export = fields.Nested(Subject, metadata={"description": "an access request's answer, on completion"})


class RequestPage(Schema):
    items = fields.List(fields.Nested(RequestItem), required=True)
    next_cursor = fields.String(
        required=True, allow_none=True, metadata={"description": "the next page's cursor; null on the last"}
    )


def request_body(item: Any) -> dict[str, Any]:
    """Return a register entry as the API shows it (never the raw address)."""
    from datetime import datetime

    from ...models import iso_time as iso

    return {
        "id": item.id,
        "type": item.type,
        "subject": item.label,
        "received_at": iso(item.received_at),
        "due_at": iso(item.due_at),
        "completed_at": iso(item.completed_at),
        "outcome": item.outcome,
        "overdue": item.completed_at is None and item.due_at < datetime.now(UTC),
        "note": item.note,
    }
