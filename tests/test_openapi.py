"""The API describes itself, and schemathesis holds it to the description."""

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import checks

from prefs.web import api
from prefs.web.api.openapi import OPERATIONS
from tests.factories import bearer, make_key, make_subscriber, make_topic
from tests.reliability.figures import report

CASES_PER_OPERATION = 200  # x 10 operations: 2,000 generated cases in all

# raw messages for /inbound: well-formed ones with and without tokens, and plain junk
_header = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
MESSAGES = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda sender, subject, body: f"From: {sender}\r\nSubject: {subject}\r\n\r\n{body}".encode(),
        st.one_of(_header, st.just("ann@example.com")),
        st.one_of(_header, st.just("unsubscribe-AAAAAAAAAAAAAAAA.news.aaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbb")),
        _header,
    ),
)
schemathesis.openapi.media_type("message/rfc822", MESSAGES)


def test_the_document_is_valid_openapi_3(client):
    document = client.get("/api/v1/openapi.json").json
    validate(document)
    assert document["openapi"].startswith("3.")
    assert document["servers"] == [{"url": "https://prefs.example.com/api/v1"}]


def test_every_api_route_is_documented_with_its_scope(app, client):
    document = client.get("/api/v1/openapi.json").json
    documented = {(op.path, op.method): op.scope for op in OPERATIONS}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.endpoint == "api.openapi":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule.removeprefix("/api/v1"))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            view = app.view_functions[rule.endpoint]
            assert documented[(path, method.lower())] == view.scope
            assert document["paths"][path][method.lower()]["x-scopes"] == [view.scope]
    assert api.bp.name == "api"


@pytest.mark.reliability
def test_the_api_keeps_its_document(app, session):
    """Generated cases for every operation, with a valid key: no 5xx, nothing off the document."""
    make_topic(session, "news")
    make_topic(session, "events", opt_in=True)
    make_subscriber(session, "ann@example.com")
    headers = bearer(make_key(session, "send", "read", "write", "admin"))
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    ran: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        check_operation(operation, headers, ran)
    assert len(ran) == len(OPERATIONS)
    # call_and_validate raised on any 5xx or any response off the document: none did
    report(
        "schemathesis, every operation",
        sum(ran.values()),
        sum(ran.values()),
        0,
        0,
        f"schemathesis: {sum(ran.values())} generated cases across {len(ran)} operations with a valid key, "
        "0 5xx, 0 responses off the document",
    )
    assert sum(ran.values()) >= 2000, ran


def check_operation(operation, headers, ran):
    """Run the generated cases of one operation."""

    @settings(
        max_examples=CASES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy())
    def call(case):
        ran[operation.label] = ran.get(operation.label, 0) + 1
        # an unknown topic or a stranger's address is schema-valid yet rightly refused
        case.call_and_validate(headers=headers, excluded_checks=[checks.positive_data_acceptance])

    call()
