"""The Python client against a real HTTP server."""

import pytest

from prefs.client import Client, PrefsError
from tests.factories import make_key, make_topic
from tests.servers import serving


def test_a_campaign_send_with_the_client(app, session):
    make_topic(session, "news")
    secret = make_key(session, "send", "read", "write")
    with serving(app) as origin:
        client = Client(origin, secret)
        results = client.check("news", ["ann@example.com", "bob@example.com", "bad"], campaign="c1")
        assert [r["allowed"] for r in results] == [True, True, False]
        assert results[0]["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        answers = client.events([{"type": "complaint", "email": "bob@example.com"}])
        assert answers == [{"status": "accepted", "changed": True}]
        assert [s["email"] for s in client.suppressions("news", limit=1)] == ["bob@example.com"]
        items, cursor = client.changes()
        assert [(i["email"], i["reason"]) for i in items] == [("bob@example.com", "complained")]
        assert client.changes(cursor) == ([], cursor)
        assert client.check("news", ["bob@example.com"])[0]["reason"] == "complained"


def test_errors_become_prefs_errors(app, session):
    secret = make_key(session, "read")
    with serving(app) as origin:
        with pytest.raises(PrefsError) as err:
            Client(origin, secret).check("news", ["a@example.com"])
        assert err.value.status == 403 and err.value.code == "forbidden"
        with pytest.raises(PrefsError) as err:
            list(Client(origin, secret).suppressions("nope"))
        assert err.value.status == 422 and "topic" in err.value.fields
