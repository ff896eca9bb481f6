"""What a recipient sees: one-click unsubscribe, the unsubscribe page, the preference center.

GET and HEAD never change anything: mail scanners fetch every link in a message.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, current_app, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_babel import gettext as _
from flask_limiter import RateLimitExceeded
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wrappers import Response

from ..domain import ledger, link_requests, privacy, topics, undo
from ..domain.addresses import mask, normalize, normalize_or_none
from ..domain.changes import Origin
from ..domain.rules import held_by, verdict
from ..errors import DomainError, InvalidAddress, InvalidToken, NotRecorded, UnknownSubscriber, UnknownTopic
from ..extensions import limiter, session
from ..mail.outbound import Mailer, MailError, compose
from ..models import Subscriber, Topic
from . import i18n, links, oneclick, ratelimit
from .responses import API_PREFIX, page_error

bp = Blueprint("public", __name__)
log = logging.getLogger(__name__)

STYLESHEET = "static/pages.css"


def register(app: Flask) -> None:
    """Add the public pages to the app."""
    app.register_blueprint(bp)


def _config(name: str) -> Any:
    return current_app.config[name]


def _requested_address() -> str | None:
    """Return the normalized address the request form names, or None."""
    if "requested_address" not in g:
        try:
            raw = request.form.get("email", "")
        except RequestEntityTooLarge:
            raw = ""  # the view answers 413
        g.requested_address = normalize_or_none(raw) if raw else None
    address: str | None = g.requested_address
    return address


def _address_key() -> str:
    return ratelimit.address_key(_requested_address() or "")


def client_origin(
    key: bytes, source: str, campaign: str | None, ip: str | None, user_agent: str | None
) -> Origin:
    """Return the audit origin of a change a client asked for, fingerprinted with ``key``."""
    return Origin(source, campaign, privacy.client_fingerprint(key, ip, user_agent))


def _origin(source: str, campaign: str | None = None) -> Origin:
    key = privacy.fingerprint_key(session())
    return client_origin(key, source, campaign, request.remote_addr, request.user_agent.string)


def _lang() -> str:
    return i18n.current_language()


def _receives(subscriber: Subscriber, topic: Topic) -> bool:
    """Tell whether this topic is sent to the subscriber now, as the one rule says."""
    category = topics.category_of(topic)
    return verdict(ledger.state_of(session(), subscriber, category), category).allowed


def _topic_rows(subscriber: Subscriber) -> list[tuple[Topic, bool]]:
    return [(t, _receives(subscriber, t)) for t in topics.list_topics(session(), include_archived=False)]


@bp.route(oneclick.ROUTE, methods=["GET", "POST"])
def unsubscribe(token: str) -> ResponseReturnValue:
    """Ask before unsubscribing (GET), or record the opt-out the link names (POST)."""
    if request.method == "POST":
        one_click = oneclick.answerer()
        if request.form.get("List-Unsubscribe") == oneclick.ONE_CLICK:
            # RFC 8058: the mailbox provider's server posts with no context; answered as the
            # fast path answers it
            answer = one_click.answer(token, request.remote_addr, request.user_agent.string, _lang())
            return Response(answer.body, answer.status, answer.headers)
        # the page's own forms count against the link's limit too
        retry_after = one_click.limited(token)
        if retry_after is not None:
            answer = one_click.page(429, _lang(), [("Retry-After", str(retry_after))])
            return Response(answer.body, answer.status, answer.headers)
    link = links.tokens().read_unsubscribe(token)
    subscriber = ledger.subscriber_by_public_id(session(), link.public_id)
    topic = topics.get_topic(session(), link.topic) if link.topic else None
    page: dict[str, Any] = {
        "token": token,
        "topic": topic,
        "address": mask(subscriber.email),
        # the link's own token: the preference center then records the link's campaign
        "preferences_url": url_for(".preferences", token=token, lang=i18n.chosen_language()),
    }
    if request.method != "POST":
        # GET, HEAD: only ask; scanners fetch every link
        return render_template("unsubscribe.html", **page)
    if request.form.get("action") == "undo":
        return _undo(token, link.public_id, link.campaign, page)
    if request.form.get("scope") == "all":
        topic = page["topic"] = None
    click = undo.record_click(
        session(), link.public_id, topic.key if topic else None, _origin("page", link.campaign)
    )
    # undo brings back what this click took away, never a choice made before it
    page["undo"] = None if click.undo is None else links.tokens().undo(click.undo, token)
    page["stopped"] = click.undo is not None or (topic is None and click.changed)
    page["others"] = [t for t, on in _topic_rows(subscriber) if on and t.key != topic.key] if topic else []
    return render_template("unsubscribed.html", **page)


def _undo(token: str, public_id: str, campaign: str | None, page: dict[str, Any]) -> ResponseReturnValue:
    """Revert the click the posted undo form names, if this link's click earned it and nothing came after."""
    try:
        ref = links.tokens().read_undo(request.form.get("undo", ""), token)
    except InvalidToken:
        return _undo_refused(400)
    if ref.public_id != public_id:
        return _undo_refused(400)
    if not undo.undo(session(), ref, _origin("page", campaign)):
        return _undo_refused(409)
    page["topic"] = topics.get_topic(session(), ref.topic) if ref.topic else None
    return render_template("resubscribed.html", **page)


def _undo_refused(status: int) -> ResponseReturnValue:
    # an error page holds no token: the request form instead of links, no language switch
    return render_template("undo_refused.html", languages=[]), status


def _preferences_identity(token: str) -> tuple[str, str | None]:
    """Return the public id and campaign of a link that may open the preference center."""
    service = links.tokens()
    try:
        return service.read_preferences(token), None
    except InvalidToken:
        link = service.read_unsubscribe(token)
        return link.public_id, link.campaign


@bp.route("/p/<token>", methods=["GET", "POST"])
def preferences(token: str) -> ResponseReturnValue:
    """Show the preference center (GET), or save its form (POST)."""
    public_id, campaign = _preferences_identity(token)
    subscriber = ledger.subscriber_by_public_id(session(), public_id)
    if request.method == "POST":
        origin = _origin("preferences", campaign)
        if request.form.get("action") == "leave-all":
            ledger.record_opt_out(session(), public_id, None, origin)
            done = "left-all"
        else:
            wanted = set(request.form.getlist("topic"))
            # only what differs from what is sent now: one audit event per real change
            changes = {t.key: t.key in wanted for t, on in _topic_rows(subscriber) if (t.key in wanted) != on}
            ledger.record_choices(session(), public_id, changes, origin)
            done = "saved"
        target = url_for(".preferences", token=token, done=done, lang=i18n.chosen_language())
        return redirect(target, code=303)
    # a hard bounce is lifted only by a mailer or an operator: ticking topics here cannot
    bounced = held_by(subscriber.left_all_reason, subscriber.bounced_at is not None, "preferences")
    return render_template(
        "preferences.html",
        token=token,
        address=mask(subscriber.email),
        rows=_topic_rows(subscriber),
        left_all=subscriber.left_all_reason is not None,
        bounced=bounced == "bounced",
        done=request.args.get("done"),
    )


@bp.route("/unsubscribe", methods=["GET", "POST"])
@limiter.limit(lambda: _config("RATELIMIT_PER_CLIENT"), methods=["POST"], scope="request-client")
@limiter.limit(
    lambda: _config("RATELIMIT_PER_ADDRESS"),
    key_func=_address_key,
    exempt_when=lambda: _requested_address() is None,
    methods=["POST"],
    scope="request-address",
)
def request_link() -> ResponseReturnValue:
    """Ask for an address (GET), or email it a link to its preference center (POST)."""
    if request.method != "POST":
        return render_template("request.html")
    raw = request.form.get("email", "")
    try:
        address = normalize(raw)
    except InvalidAddress:
        return render_template("request.html", email=raw[:320], invalid=True), 400
    started = time.monotonic()
    try:
        _send_link(address)
    finally:
        # a new address costs a write the others do not: a floor hides the difference
        time.sleep(max(0.0, _config("REQUEST_MIN_SECONDS") - (time.monotonic() - started)))
    # the same page, status and size for every valid address: it tells nobody who is on file
    return render_template("request_sent.html", address=mask(address))


def _send_link(address: str) -> None:
    """Email the address its preferences link; an erased address gets a note and no link."""
    try:
        public_id = link_requests.public_id_for(session(), address)
    except UnknownSubscriber:
        # erased: never brought back, but still mailed, so timing tells nothing
        template, url = "mail/erased", None
    except NotRecorded as err:
        # only a new address needed the write: answered as everyone is, and told by mail
        log.warning("a new address could not be added for its link: %s", type(err.__cause__).__name__)
        template, url = "mail/unavailable", None
    else:
        token = links.tokens().preferences(public_id)
        template, url = "mail/preferences", links.preferences_url(token)
    brand = _config("BRAND_NAME")
    message = compose(
        _config("MAIL_FROM"),
        address,
        _("Your email preferences at %(brand)s", brand=brand),
        render_template(f"{template}.txt", url=url),
        render_template(f"{template}.html", url=url),
    )
    mailer: Mailer = current_app.extensions["prefs.mail"]
    mailer.send(message)


def _stylesheet() -> tuple[str, str]:
    """Return the stylesheet in the brand's colours, and a short version for its URL."""
    cached: tuple[str, str] | None = current_app.extensions.get("prefs.css")
    if cached is None:
        source = (Path(current_app.root_path) / STYLESHEET).read_text()
        css = (
            f":root {{ --accent: {_config('BRAND_COLOR')}; --on-accent: {_config('BRAND_TEXT_COLOR')}; "
            f"--link: {_config('BRAND_LINK_COLOR')}; }}\n{source}"
        )
        cached = current_app.extensions["prefs.css"] = (css, hashlib.sha256(css.encode()).hexdigest()[:10])
    return cached


@bp.route("/pages.css")
def stylesheet() -> ResponseReturnValue:
    """Serve the pages' one stylesheet, in the brand's colours."""
    response = Response(_stylesheet()[0], mimetype="text/css")
    # the URL carries the version, so browsers may keep it
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


def stylesheet_url() -> str:
    """Return the path of the pages' stylesheet, with its version, under this request's root."""
    paths = current_app.url_map.bind("localhost", script_name=request.script_root or None)
    return paths.build("public.stylesheet", {"v": _stylesheet()[1]})


@bp.app_context_processor
def page_context() -> dict[str, Any]:
    """Give every page the brand, the stylesheet and the language switch."""
    # paths only, built without the request's Host: werkzeug cannot bind some (a label longer
    # than 63 characters), and the page that refuses such a request must still render
    paths = current_app.url_map.bind("localhost", script_name=request.script_root or None)
    rule = request.url_rule
    # the switch links to this page in each language, when this page is one to GET
    page = request.endpoint if rule is not None and "GET" in (rule.methods or ()) else None
    args = request.view_args or {}
    languages = [
        (code, name, paths.build(page, {**args, "lang": code}) if page else None)
        for code, name in i18n.language_names()
    ]
    return {
        "brand_name": _config("BRAND_NAME"),
        "stylesheet_url": stylesheet_url(),
        "lang": i18n.current_language(),
        "chosen_lang": i18n.chosen_language(),
        "languages": languages,
    }


@bp.after_app_request
def security_headers(response: Response) -> Response:
    """Set the privacy headers on every page; tokens in URLs must not leak or be cached."""
    if request.path.startswith(API_PREFIX):
        return response
    for name, value in oneclick.SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "public.stylesheet":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(InvalidToken)
@bp.errorhandler(UnknownSubscriber)
@bp.errorhandler(UnknownTopic)
def invalid_link(err: DomainError) -> ResponseReturnValue:
    """Answer a link that cannot be used with a friendly page and the request form."""
    return render_template("invalid_link.html"), 400


@bp.errorhandler(DomainError)
def invalid_request(err: DomainError) -> ResponseReturnValue:
    """Answer any other domain error with the friendly 400 page."""
    title, message = i18n.error_text(400) or ("", "")
    return page_error(400, title, message)


@bp.errorhandler(RateLimitExceeded)
def too_many_requests(err: RateLimitExceeded) -> ResponseReturnValue:
    """Answer a rate limit with a friendly page and when to come back."""
    limit = limiter.current_limit
    retry_after = max(1, int(limit.reset_at - time.time())) if limit else 60
    title, message = i18n.error_text(429) or ("", "")
    body, status = page_error(429, title, message)
    return body, status, {"Retry-After": str(retry_after)}


@bp.errorhandler(MailError)
def mail_unavailable(err: MailError) -> ResponseReturnValue:
    """Answer a mail server that did not take the message; nothing tells whose address it was."""
    body, status = page_error(
        503,
        _("We could not send the email"),
        _("Our mail server did not answer. Nothing was changed; please try again in a few minutes."),
    )
    return body, status, {"Retry-After": "60"}
