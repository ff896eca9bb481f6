"""The OpenAPI 3 document, generated from the same marshmallow schemas the views load."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from . import schemas as s

ERRORS = {
    "400": "Malformed JSON or message, or an Idempotency-Key that is not 1-255 printable ASCII",
    "401": "No key, or an unknown or revoked key",
    "403": "The key lacks the scope",
    "413": "The body is larger than PREFS_MAX_BODY_BYTES",
    "415": "Wrong content type",
    "409": "It exists already; or a request with this Idempotency-Key is still being answered",
    "422": "Validation failed (`fields` names the failing ones), or the Idempotency-Key was another body's",
    "429": "Rate limit for this key; see Retry-After",
    "503": "The database is briefly unavailable; see Retry-After",
}


@dataclass(frozen=True)
class Operation:
    """One documented endpoint."""

    path: str
    method: str
    scope: str | None
    summary: str
    ok: str
    response: Any = None
    body: Any = None
    body_type: str = "application/json"
    query: Any = None
    path_params: tuple[str, ...] = ()
    errors: tuple[str, ...] = field(default=("401", "403", "429", "503"))
    extra_types: tuple[str, ...] = ()
    body_required: bool = True
    idempotent: bool = False  # takes an Idempotency-Key
    headers: tuple[tuple[str, str], ...] = ()  # the OK answer's headers: name, description


IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": (
        "Any key of yours for this request, such as a UUID (bare, or quoted as the IETF draft "
        "writes it). The same key and body within 24 hours get the first answer, status and "
        "body, and record nothing more; the same key with another body is 422. Keys are per "
        "API key."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
}
REPLAYED = {
    "description": "`true` when the answer is the one kept from an earlier request with the same key",
    "schema": {"type": "string", "enum": ["true"]},
}

_BODY_ERRORS = ("400", "401", "403", "413", "415", "422", "429", "503")
_QUERY_ERRORS = ("401", "403", "422", "429", "503")

OPERATIONS = (
    Operation(
        "/check", "post", "send",
        "Judge recipients for a category; links and List-Unsubscribe headers for the allowed ones",
        "200", s.CheckResponse, s.CheckRequest, errors=_BODY_ERRORS,
    ),
    Operation(
        "/suppressions", "get", "read",
        "Every address that may not receive a topic (or any marketing), by keyset pages or exported whole",
        "200", s.SuppressionPage, query=s.SuppressionQuery, errors=_QUERY_ERRORS,
        extra_types=("text/csv", "application/x-ndjson"),
        headers=(("X-Total-Count", "With text/csv or application/x-ndjson: how many rows follow (the CSV's"
                  " header line not counted), all read in one snapshot. A file with fewer was cut short"),),
    ),
    Operation(
        "/changes", "get", "read",
        "The ordered feed of changes to who may receive what, after a cursor",
        "200", s.ChangesPage, query=s.ChangesQuery, errors=_QUERY_ERRORS,
    ),
    Operation(
        "/events", "post", "write",
        "Report unsubscribes, re-subscriptions, complaints and hard bounces; each answered in order",
        "200", s.EventsResponse, s.EventsRequest, errors=(*_BODY_ERRORS, "409"), idempotent=True,
    ),
    Operation(
        "/inbound", "post", "write",
        "Honour a raw message sent to the unsubscribe address",
        "200", s.InboundResult, body_type="message/rfc822", errors=_BODY_ERRORS,
    ),
    Operation(
        "/subscribers/{email}", "get", "admin",
        "Everything held about an address (an access request)",
        "200", s.Subject, path_params=("email",), errors=("401", "403", "404", "429", "503"),
    ),
    Operation(
        "/subscribers/{email}", "delete", "admin",
        "Erase an address; a keyed fingerprint keeps it out of marketing",
        "204", path_params=("email",), errors=("401", "403", "404", "429", "503"),
    ),
    Operation("/topics", "get", "admin", "List the topics", "200", s.TopicList),
    Operation(
        "/requests", "post", "admin", "Record a data-subject request, due 30 days after receipt",
        "201", s.RequestItem, s.RequestCreate, errors=_BODY_ERRORS,
    ),
    Operation(
        "/requests", "get", "admin",
        "The open (overdue first), overdue or done requests, by keyset pages: pass next_cursor as cursor",
        "200", s.RequestPage, query=s.RequestQuery, errors=_QUERY_ERRORS,
    ),
    Operation(
        "/requests/{request_id}/complete", "post", "admin",
        "Close a request: attach the export (access), erase (erasure), or leave marketing (objection)",
        "200", s.RequestItem, s.RequestComplete, path_params=("request_id",),
        errors=(*_BODY_ERRORS, "404", "409"), body_required=False,
    ),
    Operation(
        "/topics", "post", "admin", "Create a topic (the key transactional is refused)",
        "201", s.TopicItem, s.TopicCreate, errors=(*_BODY_ERRORS, "409"),
    ),
    Operation(
        "/topics/{key}", "patch", "admin", "Change a topic's name, description or archived flag",
        "200", s.TopicItem, s.TopicPatch, path_params=("key",), errors=(*_BODY_ERRORS, "404"),
    ),
)  # fmt: skip


def _operation(spec: APISpec, op: Operation) -> dict[str, Any]:
    name = op.path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method}_{name}",
        "security": [{"bearer": []}],
        "description": f"Needs a key with the `{op.scope}` scope.",
        "x-scopes": [op.scope],
        "parameters": [],
        "responses": {},
    }
    for name in op.path_params:
        kind = (
            {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
            if name.endswith("_id")
            else {"type": "string", "minLength": 1}
        )
        doc["parameters"].append({"name": name, "in": "path", "required": True, "schema": kind})
    if op.query is not None:
        doc["parameters"].append({"in": "query", "schema": op.query})
    if op.idempotent:
        doc["parameters"].append(IDEMPOTENCY_KEY)
    if op.body is not None:
        doc["requestBody"] = {"required": op.body_required, "content": {op.body_type: {"schema": op.body}}}
    elif op.body_type != "application/json":
        doc["requestBody"] = {
            "required": True,
            "content": {op.body_type: {"schema": {"type": "string", "format": "binary"}}},
        }
    ok: dict[str, Any] = {"description": "OK"}
    if op.response is not None:
        ok["content"] = {"application/json": {"schema": op.response}}
        for media in op.extra_types:
            ok["content"][media] = {"schema": {"type": "string"}}
    if op.idempotent:
        ok["headers"] = {"Idempotent-Replayed": REPLAYED}
    if op.headers:
        ok["headers"] = {
            name: {"description": text, "schema": {"type": "integer", "minimum": 0}}
            for name, text in op.headers
        }
    doc["responses"][op.ok] = ok
    for code in sorted(op.errors):
        doc["responses"][code] = {
            "description": ERRORS.get(code, "Error"),
            "content": {"application/json": {"schema": "Error"}},
        }
    return doc


@lru_cache(maxsize=8)
def document(server: str) -> dict[str, Any]:
    """Return the OpenAPI document for an API served at ``server``."""
    spec = APISpec(
        title="prefs mailer API",
        version="1",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        servers=[{"url": f"{server}/api/v1"}],
        info={
            "description": "Send-time verdicts, suppression export and sync, event intake, subject access."
        },
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.schema("Error", schema=s.Error)
    spec.components.schema("EventItem", schema=s.EventItem)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(spec, op)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    # the view loads each event with EventItem on its own, to answer each in order
    events = document["components"]["schemas"]["EventsRequest"]["properties"]["events"]
    events["items"] = {"$ref": "#/components/schemas/EventItem"}
    return document
