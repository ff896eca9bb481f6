"""Nobody gets in: every API endpoint, every kind of missing or wrong key, table-driven."""

import base64

import pytest
from sqlalchemy import inspect, text

from prefs.domain.keys import SCOPES, revoke_key
from prefs.extensions import db
from tests.factories import bearer, make_key

# every endpoint and the scope it needs; a new endpoint fails the coverage test until listed
ENDPOINTS = {
    ("POST", "/api/v1/check"): "send",
    ("GET", "/api/v1/suppressions"): "read",
    ("GET", "/api/v1/changes"): "read",
    ("POST", "/api/v1/events"): "write",
    ("POST", "/api/v1/inbound"): "write",
    ("GET", "/api/v1/subscribers/<address:email>"): "admin",
    ("DELETE", "/api/v1/subscribers/<address:email>"): "admin",
    ("GET", "/api/v1/topics"): "admin",
    ("POST", "/api/v1/topics"): "admin",
    ("PATCH", "/api/v1/topics/<key>"): "admin",
    ("POST", "/api/v1/requests"): "admin",
    ("GET", "/api/v1/requests"): "admin",
    ("POST", "/api/v1/requests/<int:request_id>/complete"): "admin",
}
PUBLIC = {("GET", "/api/v1/openapi.json")}


def test_the_table_covers_every_api_endpoint(app):
    found = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert found == set(ENDPOINTS) | PUBLIC


def call(client, method, rule, headers):
    path = (
        rule.replace("<address:email>", "ann@example.com")
        .replace("<key>", "news")
        .replace("<int:request_id>", "1")
    )
    return client.open(path, method=method, headers=headers, json={})


@pytest.mark.parametrize(("method", "rule"), sorted(ENDPOINTS))
def test_no_key_malformed_key_and_revoked_key_are_401(client, session, method, rule):
    secret = make_key(session, *SCOPES, name="revoked")
    revoke_key(session, "revoked")
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Token " + secret},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        bearer("prefs_" + "x" * 43),
        bearer(secret),
        bearer(secret + "x"),
    ):
        response = call(client, method, rule, headers)
        assert response.status_code == 401, (headers, response.status_code)
        assert response.json["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("method", "rule"), sorted(ENDPOINTS))
def test_every_wrong_scope_is_403(client, session, method, rule):
    needed = ENDPOINTS[(method, rule)]
    for scope in SCOPES:
        if scope == needed:
            continue
        response = call(client, method, rule, bearer(make_key(session, scope, name=f"only-{scope}")))
        assert response.status_code == 403, (scope, response.status_code)


@pytest.mark.parametrize(("method", "rule"), sorted(ENDPOINTS))
def test_the_right_scope_gets_past_the_door(client, session, method, rule):
    response = call(client, method, rule, bearer(make_key(session, ENDPOINTS[(method, rule)])))
    assert response.status_code not in (401, 403)


def test_no_key_secret_is_stored_in_plain_text(app, session):
    secrets_made = [make_key(session, scope, name=f"k-{scope}") for scope in SCOPES]
    with db.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            dump = repr(conn.execute(text(f'SELECT * FROM "{table}"')).all())
            for secret in secrets_made:
                assert secret not in dump and secret.removeprefix("prefs_") not in dump


# the operator's overview (HTTP Basic, an admin key as the password) and the metrics scrape
ADMIN = {
    ("GET", "/admin"),
    ("GET", "/admin/charts/opt-outs.svg"),
    ("GET", "/admin/charts/sources.svg"),
    ("GET", "/admin/requests"),
    ("GET", "/admin/campaigns"),
    ("GET", "/admin/topics"),
    ("POST", "/admin/search"),
}
METRICS = {("GET", "/metrics")}


def basic(password, user="ops"):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_the_tables_cover_every_admin_and_metrics_endpoint(app):
    found = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(("/admin", "/metrics"))
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert found == ADMIN | METRICS


@pytest.mark.parametrize(("method", "rule"), sorted(ADMIN))
def test_the_overview_refuses_every_missing_malformed_revoked_and_wrong_scope_key(
    client, session, method, rule
):
    revoked = make_key(session, "admin", name="revoked-admin")
    revoke_key(session, "revoked-admin")
    live = make_key(session, "admin", name="live-admin")
    for headers in (
        {},
        {"Authorization": "Basic"},
        {"Authorization": "Basic !!!not-base64"},
        basic(""),
        basic("not-a-key"),
        basic(revoked),
        basic(live + "x"),
        bearer(live),  # the API's scheme is not the overview's
    ):
        response = client.open(rule, method=method, headers=headers, data={"email": "ann@example.com"})
        assert response.status_code == 401, (headers, response.status_code)
        assert "Basic" in response.headers["WWW-Authenticate"]
    for scope in ("send", "read", "write"):
        key = make_key(session, scope, name=f"overview-{scope}")
        response = client.open(rule, method=method, headers=basic(key), data={"email": "ann@example.com"})
        assert response.status_code == 403, (scope, response.status_code)
    response = client.open(rule, method=method, headers=basic(live), data={"email": "ann@example.com"})
    assert response.status_code not in (401, 403)


def test_metrics_with_a_token_refuse_every_other_credential(make_app):
    token = "metrics-token-0123456789"
    app = make_app(METRICS_TOKEN=token)
    client = app.test_client()
    with app.app_context():
        admin = make_key(db.session(), "admin")
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"},
        {"Authorization": f"Token {token}"},
        basic(token),
        bearer(admin),
    ):
        response = client.get("/metrics", headers=headers)
        assert response.status_code == 401, (headers, response.status_code)
    assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_metrics_without_a_token_answer_only_unforwarded_local_requests(client):
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 403
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    assert (
        client.get("/metrics", headers=forwarded, environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code
        == 403
    )
