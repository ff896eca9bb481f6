"""The operations surface: ``/metrics``, and the timing and JSON log line of every request."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from ..domain.compliance.requests import count_requests
from ..extensions import db
from . import metric_files
from .logs import request_id
from .metrics import ERRORS, LATENCY, dropped, prepare

READABLE = "prefs_register_readable"
READABLE_HELP = (
    "1 when the open requests below were read from the database at this scrape, 0 when it did not answer"
)
# set in a request's environ once its access line is written: gunicorn's logger then writes none
LOGGED = "prefs.logged"
access = logging.getLogger("prefs.access")
log = logging.getLogger(__name__)
bp = Blueprint("monitoring", __name__)


# the methods a label may name; any other a client invents is counted as "other"
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"))


def method_label(method: str) -> str:
    """Return a request's method as a metric label: one of a fixed few, never what a client made up."""
    return method if method in METHODS else "other"


def route() -> str:
    """Return the route pattern of this request (never its path, which may hold a token)."""
    rule = request.url_rule
    return rule.rule if rule is not None else "<unmatched>"


class RegisterCollector(Collector):
    """Read the open and overdue requests from the database at scrape time.

    A database that does not answer leaves these two out and says so in
    ``prefs_register_readable``: the workers' own figures are what an outage needs most.
    """

    def collect(self) -> Iterator[Metric]:
        try:
            open_count, overdue = count_requests(db.session())
        except SQLAlchemyError as err:
            db.session.rollback()
            log.warning(
                "metrics: open requests not read, the database did not answer (%s)", type(err).__name__
            )
            yield GaugeMetricFamily(READABLE, READABLE_HELP, 0)
            return
        yield GaugeMetricFamily(READABLE, READABLE_HELP, 1)
        yield GaugeMetricFamily("prefs_requests_open", "Data-subject requests not yet completed", open_count)
        yield GaugeMetricFamily("prefs_requests_overdue", "Open requests past their due date", overdue)


def scrape() -> bytes:
    """Return the metrics in Prometheus text format, summed across workers when multiprocess."""
    registry = CollectorRegistry()
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        registry.register(_Default())
        registry.register(RegisterCollector())
        return generate_latest(registry)
    if not os.path.isdir(folder):  # removed under the workers (a /tmp cleaner)
        raise FileNotFoundError(errno.ENOENT, "No such folder", folder)
    # the workers' files are read under the folder's lock, the database after it: a slow
    # database must not hold up the master, which retires dead workers' files under that lock
    with metric_files.reading(folder):
        figures = list(MultiProcessCollector(None, folder).collect())  # type: ignore[no-untyped-call]
    registry.register(_Read(figures))
    registry.register(RegisterCollector())
    return generate_latest(registry)


class _Read(Collector):
    """Yield metrics read already."""

    def __init__(self, figures: list[Metric]) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        yield from self.figures


class _Default(Collector):
    """Yield this process's own metrics (the default registry's)."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


# a header any proxy, CDN or load balancer adds for the client behind it: a word of its name
_PROXY_WORDS = frozenset(
    {
        "FORWARDED",
        "FORWARD",
        "VIA",
        "CLIENT",
        "REAL",
        "ORIGINAL",
        "ORIGINATING",
        "REMOTE",
        "PROXY",
        "CDN",
        "HOP",
    }
    | {"IP", "IPV4", "IPV6", "ADDR", "ADDRESS", "CLIENTIP", "SOCKETIP", "REWRITE", "EDGESCAPE"}
)
# or a vendor's prefix (Cloudflare, Fastly, Akamai, CloudFront, AWS, Azure, Envoy, Vercel,
# Netlify, Google Cloud, Fly), or a front end's timing header
_PROXY_PREFIXES = (
    "CF_", "FASTLY_", "AKAMAI_", "X_AKAMAI_", "X_AMZ_", "X_AMZN_", "X_AZURE_", "X_ENVOY_",
    "X_VERCEL_", "X_NF_", "X_CLOUD_", "X_GOOG_", "FLY_", "X_REQUEST_START", "X_QUEUE_START",
)  # fmt: skip


def forwarded(environ: dict[str, object]) -> bool:
    """Tell whether a request carries any header a proxy adds for the client behind it."""
    for key in environ:
        if not key.startswith("HTTP_"):
            continue
        name = key[5:]
        if name.startswith(_PROXY_PREFIXES) or name.endswith("IP") or "FORWARD" in name or "CLIENT" in name:
            return True
        if not _PROXY_WORDS.isdisjoint(name.split("_")):
            return True
    return False


def loopback(address: str | None) -> bool:
    """Tell whether an address is this host's own (127.0.0.0/8, ::1, or 127.x mapped into IPv6)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _allowed() -> Response | None:
    token: str | None = current_app.config["METRICS_TOKEN"]
    if token:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            return Response(
                "a bearer token is required\n", 401, {"WWW-Authenticate": 'Bearer realm="metrics"'}
            )
        return None
    # local: the socket's peer (not the client a proxy fix read from a header) is this host,
    # and nothing says a proxy on this host forwarded the request for someone elsewhere
    environ = request.environ
    peer = environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR", environ.get("REMOTE_ADDR"))
    if loopback(peer) and not forwarded(environ):
        return None
    return Response("set PREFS_METRICS_TOKEN to read the metrics from elsewhere\n", 403)


@bp.get("/metrics")
def metrics() -> Response:
    """Answer the Prometheus scrape."""
    refused = _allowed()
    if refused is not None:
        return refused
    try:
        figures = scrape()
    except OSError as err:  # the metrics folder is gone or unreadable: the workers still answer
        log.warning("metrics unreadable: %s", err.strerror or type(err).__name__)
        return Response("the metrics folder cannot be read\n", 503, {"Retry-After": "60"})
    return Response(figures, content_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


def observe(pattern: str, method: str, status: int, elapsed: float, rid: str) -> None:
    """Count one answered request in the metrics and write its access-log line."""
    try:
        LATENCY.labels(pattern, method_label(method)).observe(elapsed)
        if status >= 400:
            ERRORS.labels(str(status)).inc()
    except OSError as err:
        dropped(err)
    access.info(
        "request",
        extra={
            "request_id": rid,
            "method": method,
            "route": pattern,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
        },
    )


def register(app: Flask) -> None:
    """Time and log every request by route pattern, count errors by status, serve ``/metrics``."""
    prepare()

    @app.before_request
    def start() -> None:
        g.request_id = request_id(request.headers.get("X-Request-ID"))
        g.request_started = time.perf_counter()

    @app.after_request
    def finish(response: Response) -> Response:
        started = g.get("request_started")
        if started is None:
            return response
        observe(route(), request.method, response.status_code, time.perf_counter() - started, g.request_id)
        request.environ[LOGGED] = True
        response.headers["X-Request-ID"] = g.request_id
        return response

    app.register_blueprint(bp)
