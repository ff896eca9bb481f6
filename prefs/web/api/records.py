"""What operators and the register call: a subscriber's data, topics, data requests, the OpenAPI document."""

from __future__ import annotations

from flask import Response, request
from marshmallow import ValidationError

from ...domain import topics
from ...domain.addresses import normalize
from ...domain.compliance import requests as register
from ...domain.compliance import subjects
from ...errors import (
    InvalidAddress,
    InvalidValue,
    UnknownSubscriber,
    UnknownTopic,
)
from ...extensions import session
from ..links import base_url
from ..responses import json_error
from . import schemas as s
from .base import bp, json_body, json_response, query, requires

# an address may hold "/" (``a/b@example.com``): the rest of the path is the address, as
# sent (%2F decoded), its slashes never merged (a redirect would put it in a Location)
SUBJECT = "/subscribers/<address:email>"


@bp.get(SUBJECT, merge_slashes=False)
@requires("admin")
def subject(email: str) -> Response:
    """Return everything held about an address (an access request)."""
    return json_response(subjects.export_subject(session(), _address(email)))


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
    return json_response({"topics": [s.topic_body(t) for t in topics.list_topics(session())]})


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
    return json_response(s.topic_body(topic), 201)


@bp.patch("/topics/<key>")
@requires("admin")
def topic_update(key: str) -> Response:
    """Change a topic's name, description or archived flag."""
    payload = json_body(s.TopicPatch())
    try:
        topic = topics.update_topic(session(), key, **payload)
    except UnknownTopic as err:
        return json_error(404, err.code, str(err))  # type: ignore[return-value]
    return json_response(s.topic_body(topic))


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
    return json_response(s.request_body(item), 201)


@bp.get("/requests")
@requires("admin")
def request_list() -> Response:
    """List the open (overdue first), overdue or done requests, a keyset page at a time."""
    params = query(s.RequestQuery())
    try:
        page = register.request_page(session(), params["status"], params.get("cursor"), params["limit"])
    except InvalidValue as err:
        raise ValidationError({"cursor": [str(err)]}) from None
    return json_response(
        {"items": [s.request_body(item) for item in page.items], "next_cursor": page.next_cursor}
    )


@bp.post("/requests/<int:request_id>/complete")
@requires("admin")
def request_complete(request_id: int) -> Response:
    """Act on a request and close it: attach the export, erase, or take the address out."""
    payload = json_body(s.RequestComplete()) if request.content_length else {}
    done = register.complete_request(session(), request_id, note=payload.get("note"))
    body = s.request_body(done.request)
    if done.export is not None:
        body["export"] = done.export
    return json_response(body)


@bp.get("/openapi.json")
def openapi() -> Response:
    """Return the OpenAPI 3 document of this API."""
    from .openapi import document

    return json_response(document(base_url()))
