"""The ``flask --app prefs`` commands for operators, support staff and cron."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click
from flask import Flask, current_app
from flask.cli import AppGroup, ScriptInfo, pass_script_info, with_appcontext
from werkzeug.serving import run_simple

from . import config
from .domain import imports, ledger, topics
from .domain import keys as api_keys
from .domain.addresses import normalize
from .domain.changes import Origin
from .domain.compliance import purge
from .domain.compliance import requests as request_register
from .domain.import_formats import FORMATS, open_text
from .domain.rules import TRANSACTIONAL
from .errors import DomainError, UnknownSubscriber
from .extensions import db, migrations, session
from .models import utcnow
from .store import tallies, write_transaction
from .web import links

TRANSACTIONAL_DESCRIPTION = "Account and service email: receipts, password resets, security notices"

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Turn a domain error into one clear line and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DomainError as err:
            raise click.ClickException(str(err)) from None

    return wrapper  # type: ignore[return-value]


topics_group = AppGroup("topics", help="Create, list and archive marketing topics.")
keys_group = AppGroup("keys", help="Create, list and revoke API keys for mailers.")


@topics_group.command("create")
@click.argument("key")
@click.option("--name", required=True, help="What people see in the preference center.")
@click.option("--description", default="", help="One sentence on what the topic sends.")
@click.option(
    "--opt-in",
    is_flag=True,
    help="Send only to those who chose it (default: all until they opt out).",
)
@reports_errors
def topics_create(key: str, name: str, description: str, opt_in: bool) -> None:
    """Create a marketing topic."""
    topic = topics.create_topic(session(), key, name, description, opt_in)
    click.echo(f"created topic {topic.key} ({'opt-in' if topic.opt_in else 'opt-out'})")


@topics_group.command("list")
def topics_list() -> None:
    """List the topics."""
    click.echo(f"{TRANSACTIONAL}\talways sent\t{TRANSACTIONAL_DESCRIPTION}")
    for topic in topics.list_topics(session()):
        policy = "opt-in" if topic.opt_in else "opt-out"
        state = "\tarchived" if topic.archived else ""
        click.echo(f"{topic.key}\t{policy}\t{topic.name}{state}")


@topics_group.command("archive")
@click.argument("key")
@reports_errors
def topics_archive(key: str) -> None:
    """Hide a topic from the preference center; its links still unsubscribe."""
    topics.archive_topic(session(), key)
    click.echo(f"archived topic {key}")


@keys_group.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(api_keys.SCOPES))
@reports_errors
def keys_create(name: str, scopes: tuple[str, ...]) -> None:
    """Create an API key; its secret is printed once, on the last line."""
    key, secret = api_keys.create_key(session(), name, list(scopes))
    click.echo(
        f"created key {key.name} with scopes {key.scopes}; store the secret now, it is not shown again:"
    )
    click.echo(secret)


@keys_group.command("list")
def keys_list() -> None:
    """List the API keys (never their secrets)."""
    for key in api_keys.list_keys(session()):
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        click.echo(f"{key.name}\t{key.scopes}\t{state}\tcreated {key.created_at:%Y-%m-%d}")


@keys_group.command("revoke")
@click.argument("name")
@reports_errors
def keys_revoke(name: str) -> None:
    """Revoke an API key at once."""
    api_keys.revoke_key(session(), name)
    click.echo(f"revoked key {name}")


@click.command("link")
@with_appcontext
@click.argument("email")
@click.option("--topic", default=None, help="Unsubscribe from this topic only (default: all marketing).")
@click.option("--campaign", default=None, help="The campaign id the link carries.")
@reports_errors
def link(email: str, topic: str | None, campaign: str | None) -> None:
    """Print the unsubscribe link, then the preferences link, for an address."""
    address = normalize(email)
    if topic is not None:
        topics.get_topic(session(), topic)
    subscriber = ledger.ensure_subscriber(session(), address)
    service = links.tokens()
    click.echo(links.unsubscribe_url(service.unsubscribe(subscriber.public_id, topic, campaign)))
    click.echo(links.preferences_url(service.preferences(subscriber.public_id)))


@click.command("check")
@with_appcontext
@click.argument("email")
@click.argument("category")
@reports_errors
def check(email: str, category: str) -> None:
    """Print "allowed" or "suppressed REASON" for a category and an address."""
    verdict = ledger.verdict_for(session(), normalize(email), category)
    click.echo("allowed" if verdict.allowed else f"suppressed {verdict.reason}")


@click.command("unsubscribe")
@with_appcontext
@click.argument("email")
@click.option("--topic", default=None, help="Only this topic (default: all marketing).")
@reports_errors
def unsubscribe(email: str, topic: str | None) -> None:
    """Record an opt-out received by phone or by mail."""
    address = normalize(email)
    if topic is not None:
        topics.get_topic(session(), topic)
    try:
        subscriber = ledger.ensure_subscriber(session(), address)
    except UnknownSubscriber as err:
        click.echo(f"nothing to do: {err}")
        return
    changed = ledger.record_opt_out(session(), subscriber.public_id, topic, Origin("cli"), reason="support")
    scope = topic or "all marketing"
    click.echo(f"unsubscribed from {scope}" if changed else f"already unsubscribed from {scope}")


@click.command("resubscribe")
@with_appcontext
@click.argument("email")
@click.option("--topic", default=None, help="Only this topic (default: undo leaving all marketing).")
@reports_errors
def resubscribe(email: str, topic: str | None) -> None:
    """Record a re-subscription asked for by phone or by mail."""
    address = normalize(email)
    if topic is not None:
        topics.get_topic(session(), topic)
    subscriber = ledger.ensure_subscriber(session(), address)
    recorded = ledger.record_resubscribe(session(), subscriber.public_id, topic, Origin("cli"))
    scope = topic or "all marketing"
    if recorded.kept_out == "complained":
        lifted = "hard bounce lifted; " if recorded.changed else ""
        click.echo(
            f"{lifted}not resubscribed to {scope}: a complaint is lifted only by the person,"
            " in the preference center"
        )
    elif recorded.kept_out is not None:
        click.echo(f"not resubscribed to {scope}: {recorded.kept_out}")
    else:
        click.echo(f"resubscribed to {scope}" if recorded.changed else f"already subscribed to {scope}")


DEMO_TOPICS = (
    ("news", "Company news", "What we are building and why, about once a month.", False),
    ("promotions", "Offers and promotions", "Discounts and seasonal offers.", False),
    ("events", "Events", "Invitations to webinars and meet-ups near you.", True),
    ("partners", "Affiliates and partners", "Offers from companies we work with.", True),
)


@click.command("demo")
@click.option("--serve/--no-serve", default=True, help="Run the development server afterwards.")
@click.option("--port", default=5000, show_default=True)
@pass_script_info
@reports_errors
def demo(info: ScriptInfo, serve: bool, port: int) -> None:
    """Build the schema, add sample topics and print a link to open, then serve."""
    # a Flask plugin command (setup.cfg), found before the app is loaded: it loads the app
    # itself, as the one command that may run without a base URL (links go to its own origin)
    origin = config.DEMO_ORIGIN.set(f"http://127.0.0.1:{port}")
    try:
        app = info.load_app()
    finally:
        config.DEMO_ORIGIN.reset(origin)
    with app.app_context():
        _build_demo(app)
    if serve:
        # app.run() is a no-op under the flask command; serve the way `flask run` does
        run_simple("127.0.0.1", port, app, threaded=True)


def _build_demo(app: Flask) -> None:
    from flask_migrate import upgrade

    migrations(app)
    upgrade()
    db = session()
    existing = {t.key for t in topics.list_topics(db)}
    for key, name, description, opt_in in DEMO_TOPICS:
        if key not in existing:
            topics.create_topic(db, key, name, description, opt_in)
    subscriber = ledger.ensure_subscriber(db, "demo@example.com")
    service = links.tokens()
    unsubscribe = links.unsubscribe_url(service.unsubscribe(subscriber.public_id, "news", "demo"))
    click.echo("Demo ready. Open these links in a browser:")
    click.echo(f"  unsubscribe page:  {unsubscribe}")
    click.echo(f"  preference center: {links.preferences_url(service.preferences(subscriber.public_id))}")


_FILE = click.Path(exists=True, dir_okay=False)


@click.command("smtpd")
@click.option("--listen", default="127.0.0.1:8025", show_default=True, help="HOST:PORT to receive mail on.")
@click.option("--tls-cert", type=_FILE, help="Offer STARTTLS with this certificate (PEM).")
@click.option("--tls-key", type=_FILE, help="The certificate's private key (PEM).")
@with_appcontext
def smtpd(listen: str, tls_cert: str | None, tls_key: str | None) -> None:
    """Receive mail for the unsubscribe address and honour it, until stopped (Ctrl-C or SIGTERM)."""
    import signal
    import ssl
    import threading

    from .mail import smtpd as receiver

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("use HOST:PORT, e.g. 127.0.0.1:8025", param_hint="--listen")
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if not app.config.get("UNSUBSCRIBE_MAILTO"):
        raise click.ClickException(
            "PREFS_UNSUBSCRIBE_MAILTO is not set: it is the only mailbox smtpd receives for"
        )
    if bool(tls_cert) != bool(tls_key):
        raise click.BadParameter("give both --tls-cert and --tls-key, or neither", param_hint="--tls-cert")
    tls = (tls_cert, tls_key) if tls_cert and tls_key else None
    try:
        running = receiver.start(app, host.strip("[]"), int(port), tls=tls)
    except ssl.SSLError as err:
        raise click.ClickException(f"--tls-cert/--tls-key cannot be used: {err.reason or err}") from None
    click.echo(f"receiving unsubscribe mail on {listen}; stop with Ctrl-C")
    # SIGTERM (a service manager's stop) ends it the way Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        running.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command("import")
@with_appcontext
@click.argument("file", type=click.File("rb", lazy=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(("auto", *FORMATS)),
    default="auto",
    show_default=True,
    help="The exporting service's layout; auto tells it from the header.",
)
@click.option("--topic", default=None, help="Opt out of this topic only (default: all marketing).")
@click.option("--dry-run", is_flag=True, help="Count what would change, and change nothing.")
@click.option(
    "--encoding",
    default=None,
    help="The file's encoding, where it is not Unicode (default: its byte order mark, else UTF-8).",
)
@reports_errors
def import_command(file: Any, fmt: str, topic: str | None, dry_run: bool, encoding: str | None) -> None:
    """Import a suppression list exported from another service (source: import)."""
    text = open_text(file, encoding)
    try:
        summary = imports.import_file(session(), text, fmt, topic, dry_run)
    except UnicodeDecodeError as err:
        # a stream read once (standard input) is checked as it is read: what came before is in
        raise click.ClickException(
            f"the file is not {text.encoding} ({err.reason}); rows before it may be in already: "
            "save it as UTF-8, or name its encoding with --encoding, and import it again"
        ) from None
    finally:
        text.detach()  # the file is click's to close
    verb = "would add" if dry_run else "added"
    click.echo(
        f"{summary.format}: read {summary.read}, {verb} {summary.added}, "
        f"already suppressed {summary.already}, erased (skipped) {summary.erased}, "
        f"invalid {summary.invalid}"
    )
    if summary.invalid:
        lines = ", ".join(str(n) for n in summary.invalid_lines)
        more = (
            f" and {summary.invalid - len(summary.invalid_lines)} more"
            if summary.invalid > len(summary.invalid_lines)
            else ""
        )
        click.echo(f"invalid addresses on lines {lines}{more}")


requests_group = AppGroup("requests", help="The register of access, erasure and other requests.")


@requests_group.command("overdue")
def requests_overdue() -> None:
    """Print the open requests past their 30-day due date (for a cron mail); none prints nothing."""
    now = utcnow()
    for item in request_register.each_request(session(), "overdue", now):
        late = (now - item.due_at).days
        click.echo(
            f"#{item.id}\t{item.type}\t{item.label}\treceived {item.received_at:%Y-%m-%d}"
            f"\tdue {item.due_at:%Y-%m-%d}\toverdue by {late} days"
        )


erasures_group = AppGroup("erasures", help="Clear what erased addresses leave in the database's files.")


@erasures_group.command("purge")
@click.option(
    "--full",
    is_flag=True,
    help="PostgreSQL: rewrite the subscribers table too (VACUUM FULL, an exclusive lock while it runs).",
)
def erasures_purge(full: bool) -> None:
    """Clear erased rows' bytes: SQLite's log; PostgreSQL's dead rows and index entries (for cron)."""
    for done in purge.purge(db.engine, full):
        click.echo(done)


@click.command("recount")
@with_appcontext
@reports_errors
def recount() -> None:
    """Count the overview's figures again from the tables (writers go on meanwhile).

    Needed only after rows were written with the triggers off (``session_replication_role
    = replica``, ``DISABLE TRIGGER``, a TRUNCATE): the counts are otherwise kept as rows change.
    """
    db = session()
    with write_transaction(db):
        tallies.recount(db.connection())
    click.echo("counted the subscribers, preferences and events again")


def register(app: Flask) -> None:
    """Add the commands to ``flask --app prefs``."""
    for command in (
        topics_group,
        keys_group,
        link,
        check,
        unsubscribe,
        resubscribe,
        smtpd,
        import_command,
        requests_group,
        erasures_group,
        recount,
    ):
        app.cli.add_command(command)
