"""The operator's overview at ``/admin``: HTTP Basic with an ``admin`` key as the password.

No cookies and no state-changing forms: the one form (search) only reads, and sends
the address in a POST body so that it never lands in a URL or an access log. Every
table is paged by an opaque keyset cursor (``after``), which holds no address.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request
from flask.typing import ResponseReturnValue

from ...domain import campaigns, keys, ledger, overview, topics
from ...domain.addresses import normalize
from ...domain.compliance import requests as register
from ...errors import InvalidAddress, InvalidValue
from ...extensions import session
from ...models import utcnow

bp = Blueprint("admin", __name__, url_prefix="/admin")
DAYS = 90
# rows a table shows at a time: the page weighs the same whatever the register holds
PAGE = 50
REALM = 'Basic realm="prefs admin", charset="UTF-8"'
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Robots-Tag": "noindex",
}


@bp.before_request
def authenticate() -> ResponseReturnValue | None:
    """Let only a live key with the ``admin`` scope in, given as the Basic password."""
    auth = request.authorization
    key = None
    if auth is not None and auth.type == "basic" and auth.password:
        key = keys.authenticate(session(), auth.password)
    if key is None:
        return Response(
            "An admin key is required (any user name, the key as password).\n",
            401,
            {"WWW-Authenticate": REALM, **HEADERS},
        )
    if "admin" not in keys.scopes_of(key):
        return Response("This key lacks the admin scope.\n", 403, HEADERS)
    return None


@bp.after_request
def headers(response: Response) -> Response:
    """Keep the overview out of caches, frames and search engines."""
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@bp.errorhandler(InvalidValue)
def invalid_page(err: InvalidValue) -> ResponseReturnValue:
    """Answer a page link that names no page (a cursor or status not given out here)."""
    return render_template("admin/message.html", title="No such page", message=str(err)), 400


@bp.get("")
def index() -> ResponseReturnValue:
    """Show the overview: charts, and the first page of the requests, campaigns and topics."""
    db = session()
    now = utcnow()
    days, series = overview.opt_outs_per_day(db, DAYS, now)
    return render_template(
        "admin/overview.html",
        days=days,
        series=series,
        active_days=[i for i, _ in enumerate(days) if any(values[i] for values in series.values())],
        sources=overview.opt_outs_by_source(db, DAYS, now),
        campaigns=campaigns.page(db, None, PAGE),
        topics=overview.audience_page(db, None, PAGE),
        requests=register.request_page(db, "open", None, PAGE, now),
        now=now,
    )


@bp.get("/requests")
def request_list() -> ResponseReturnValue:
    """Show a page of the register: open (overdue first), overdue, or done (newest first)."""
    now = utcnow()
    status = request.args.get("status", "open")
    page = register.request_page(session(), status, request.args.get("after") or None, PAGE, now)
    return render_template("admin/requests.html", requests=page, status=status, now=now)


@bp.get("/campaigns")
def campaign_list() -> ResponseReturnValue:
    """Show a page of campaigns, newest first."""
    page = campaigns.page(session(), request.args.get("after") or None, PAGE)
    return render_template("admin/campaigns.html", campaigns=page)


@bp.get("/topics")
def topic_list() -> ResponseReturnValue:
    """Show a page of topics and the subscribers each reaches."""
    page = overview.audience_page(session(), request.args.get("after") or None, PAGE)
    return render_template("admin/topics.html", topics=page)


@bp.get("/charts/opt-outs.svg")
def opt_outs_svg() -> ResponseReturnValue:
    """Draw opt-outs per day, one line per topic."""
    days, series = overview.opt_outs_per_day(session(), DAYS)
    from . import charts  # pygal only in the process that draws: every worker saves its memory

    return _svg(charts.opt_outs_chart(days, series))


@bp.get("/charts/sources.svg")
def sources_svg() -> ResponseReturnValue:
    """Draw the share of each source."""
    from . import charts

    return _svg(charts.sources_chart(overview.opt_outs_by_source(session(), DAYS)))


def _svg(svg: str) -> Response:
    return Response(
        svg,
        mimetype="image/svg+xml",
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
    )


@bp.post("/search")
def search() -> ResponseReturnValue:
    """Show one subscriber's state and every audit event, for support staff."""
    db = session()
    given = request.form.get("email", "")
    try:
        email = normalize(given)
    except InvalidAddress as err:
        return render_template("admin/subscriber.html", given=given, error=str(err)), 422
    subscriber = ledger.find_subscriber(db, email)
    if subscriber is None:
        return render_template(
            "admin/subscriber.html", given=email, erased=ledger.is_erased(db, email), subscriber=None
        ), 404
    verdicts = [(topic, ledger.verdict_for(db, email, topic.key)) for topic in topics.list_topics(db)]
    return render_template(
        "admin/subscriber.html",
        given=email,
        subscriber=subscriber,
        verdicts=verdicts,
        history=ledger.history(db, subscriber),
    )
