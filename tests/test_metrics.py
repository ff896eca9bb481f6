"""``/metrics``: Prometheus text that prometheus-client's parser reads, and who may read it."""

from collections import Counter
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefs.domain import ledger
from prefs.domain.changes import Origin
from prefs.domain.compliance import requests as register
from prefs.models import utcnow
from prefs.ops import metrics
from tests.factories import make_subscriber, make_topic

TOKEN = "metrics-token-0123456789"


def scrape(client, **kwargs):
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200, response.data
    assert response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_changes_are_counted_by_topic_and_source_once_committed(client, session):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    before = scrape(client)
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click", campaign="c1"))
    ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click"))  # no change: not counted
    ledger.record_opt_out(session, ann.public_id, None, Origin("api"), reason="complained")
    ledger.record_resubscribe(session, ann.public_id, "news", Origin("preferences"))
    after = scrape(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("prefs_opt_outs_total", topic="news", source="one-click", reason="unsubscribed") == 1
    assert delta("prefs_opt_outs_total", topic="all", source="api", reason="complained") == 1
    assert delta("prefs_resubscribes_total", topic="news", source="preferences") == 1


def test_a_rolled_back_change_is_not_counted(client, session):
    make_topic(session, "news")
    ann = make_subscriber(session)
    before = scrape(client)
    metrics.count_change(session, None, "unsubscribe", "unsubscribed", "api")
    session.rollback()
    after = scrape(client)
    key = ("prefs_opt_outs_total", (("reason", "unsubscribed"), ("source", "api"), ("topic", "all")))
    assert after.get(key, 0) == before.get(key, 0)
    assert ann.id  # the subscriber is untouched


def test_check_calls_recipients_and_verdicts(client):
    before = scrape(client)
    metrics.count_check("news", 5, Counter({None: 3, "unsubscribed": 1, "invalid_address": 1}))
    after = scrape(client)
    assert (
        value(after, "prefs_check_calls_total", topic="news")
        - value(before, "prefs_check_calls_total", topic="news")
        == 1
    )
    assert (
        value(after, "prefs_check_recipients_total", topic="news")
        - value(before, "prefs_check_recipients_total", topic="news")
        == 5
    )
    for reason, count in (("allowed", 3), ("unsubscribed", 1), ("invalid_address", 1)):
        labels = {"topic": "news", "reason": reason}
        assert (
            value(after, "prefs_check_verdicts_total", **labels)
            - value(before, "prefs_check_verdicts_total", **labels)
            == count
        )


def test_latency_is_by_route_pattern_and_errors_by_status(client):
    before = scrape(client)
    client.get("/healthz")
    client.get("/no/such/page/with-a-secret")
    after = scrape(client)
    count = "prefs_request_duration_seconds_count"
    assert (
        value(after, count, endpoint="/healthz", method="GET")
        - value(before, count, endpoint="/healthz", method="GET")
        == 1
    )
    assert (
        value(after, "prefs_http_errors_total", status="404")
        - value(before, "prefs_http_errors_total", status="404")
        >= 1
    )
    assert not any("with-a-secret" in str(labels) for _, labels in after)


def test_open_and_overdue_requests_are_read_at_scrape_time(client, session):
    now = utcnow()
    register.record_request(session, "access", "ann@example.com", received_at=now - timedelta(days=31))
    register.record_request(session, "erasure", "bob@example.com")
    samples = scrape(client)
    assert value(samples, "prefs_requests_open") == 2
    assert value(samples, "prefs_requests_overdue") == 1


def test_without_a_token_only_this_host_may_read(client):
    assert client.get("/metrics").status_code == 200
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403
    # a proxy on this host makes every client look local; a forwarded request is not
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 403


@pytest.mark.parametrize(
    "header",
    [
        "X-Forwarded-For",
        "X-Real-IP",
        "Forwarded",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Client-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "Fastly-Client-IP",
        "X-Cluster-Client-IP",
        "X-Original-Forwarded-For",
        "Client-IP",
        "Via",
        # what CDNs and load balancers add instead of, or beside, the usual ones
        "CF-Connecting-IPv6",
        "CDN-Loop",
        "CF-Ray",
        "X-Azure-SocketIP",
        "X-Azure-FDID",
        "Akamai-Origin-Hop",
        "X-Akamai-Edgescape",
        "X-Amz-Cf-Id",
        "X-Amzn-Trace-Id",
        "X-Envoy-Attempt-Count",
        "X-Vercel-Id",
        "X-Nf-Client-Connection-Ip",
        "X-Cloud-Trace-Context",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-ProxyUser-IP",
        "Proxy-Connection",
        "X-Request-Start",
    ],
)
def test_without_a_token_a_request_a_proxy_forwarded_is_not_local(client, header):
    # a proxy on this host connects from 127.0.0.1 for everyone: any trace of forwarding
    # means a client elsewhere
    assert client.get("/metrics", headers={header: "203.0.113.9"}).status_code == 403


@pytest.mark.parametrize(
    ("peer", "status"), [("::1", 200), ("::ffff:127.0.0.1", 200), ("127.0.0.2", 200), ("2001:db8::1", 403)]
)
def test_local_means_a_loopback_peer_of_either_family(client, peer, status):
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": peer}).status_code == status


def test_local_is_the_socket_peer_not_the_address_a_proxy_fix_wrote(make_app):
    app = make_app(TRUSTED_PROXIES=1)
    client = app.test_client()
    forwarded = {"X-Forwarded-For": "127.0.0.1"}
    assert (
        client.get("/metrics", headers=forwarded, environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403
    )
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403


def test_with_a_token_a_bearer_must_present_it(make_app):
    app = make_app(METRICS_TOKEN=TOKEN)
    client = app.test_client()
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    remote = {"REMOTE_ADDR": "10.1.2.3"}
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, environ_base=remote)
    assert ok.status_code == 200
    assert b"prefs_requests_open" in ok.data


def test_the_check_endpoint_feeds_the_check_metrics(client, session):
    from tests.factories import bearer, make_key, make_topic

    make_topic(session, "promo")
    headers = bearer(make_key(session, "send"))
    before = scrape(client)
    body = {"topic": "promo", "recipients": ["a@example.com", "b@example.com", "not-an-address"]}
    assert client.post("/api/v1/check", json=body, headers=headers).status_code == 200
    after = scrape(client)
    assert (
        value(after, "prefs_check_recipients_total", topic="promo")
        - value(before, "prefs_check_recipients_total", topic="promo")
        == 3
    )
    assert (
        value(after, "prefs_check_verdicts_total", topic="promo", reason="invalid_address")
        - value(before, "prefs_check_verdicts_total", topic="promo", reason="invalid_address")
        == 1
    )


def test_a_figure_with_no_room_is_dropped_counted_and_logged_once(client, session, monkeypatch, caplog):
    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    before = scrape(client)

    def no_room(*labels):
        raise OSError(28, "No space left on device")

    for figure in (metrics.LATENCY, metrics.OPT_OUTS, metrics.CHECK_CALLS):
        monkeypatch.setattr(figure, "labels", no_room)
    monkeypatch.setattr(metrics, "_logged", False)
    assert client.get("/healthz").status_code == 200
    assert ledger.record_opt_out(session, ann.public_id, "news", Origin("one-click"))
    metrics.count_check("news", 1, Counter({None: 1}))
    monkeypatch.undo()
    after = scrape(client)
    assert value(after, "prefs_metrics_dropped_total") - value(before, "prefs_metrics_dropped_total") == 3
    lines = [r for r in caplog.records if r.name == "prefs.ops.metrics"]
    assert len(lines) == 1 and "no room" in lines[0].getMessage()
    assert not ledger.verdict_for(session, "ann@example.com", "news").allowed  # the change itself stands


def test_a_metrics_folder_gone_from_under_the_workers_is_a_503_not_a_500(client, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "cleaned away"))
    response = client.get("/metrics")
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert b"Traceback" not in response.data


def test_a_database_that_does_not_answer_leaves_out_only_the_open_requests(client, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from prefs.ops import monitoring

    def down(session):
        raise OperationalError("SELECT", None, TimeoutError("connection timeout expired"))

    client.get("/healthz")
    monkeypatch.setattr(monitoring, "count_requests", down)
    samples = scrape(client)  # 200, not the outage page
    assert value(samples, "prefs_register_readable") == 0
    assert ("prefs_requests_open", ()) not in samples
    assert value(samples, "prefs_request_duration_seconds_count", endpoint="/healthz", method="GET") >= 1
    monkeypatch.undo()
    samples = scrape(client)
    assert value(samples, "prefs_register_readable") == 1
    assert ("prefs_requests_open", ()) in samples


def test_the_folder_is_not_held_while_the_database_is_read(client, monkeypatch, tmp_path):
    # a scrape holds off the master's retiring of a dead worker's files (metric_files.retire):
    # a database that is slow to answer must not hold the master up with it
    import fcntl
    import os

    from prefs.ops import metric_files, monitoring

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    free = []

    def read_while_checking(session):
        fd = os.open(tmp_path / metric_files.LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free.append(True)
        except BlockingIOError:
            free.append(False)
        finally:
            os.close(fd)
        return 0, 0

    monkeypatch.setattr(monitoring, "count_requests", read_while_checking)
    samples = scrape(client)
    assert value(samples, "prefs_requests_open") == 0
    assert free == [True]
