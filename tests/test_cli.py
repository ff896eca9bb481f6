"""Every ``flask --app prefs`` command, through Click's runner."""

from click.testing import CliRunner
from flask.cli import FlaskGroup
from sqlalchemy import select

from prefs.domain import ledger
from prefs.domain.privacy import secret_hash
from prefs.models import ApiKey, Event
from tests.factories import make_topic


def run(runner, *args):
    return runner.invoke(args=list(args))


def last_line(result):
    return result.output.strip().splitlines()[-1]


def test_topics_create_list_archive(runner, session):
    result = run(runner, "topics", "create", "news", "--name", "Company news", "--description", "Monthly")
    assert result.exit_code == 0, result.output
    assert run(runner, "topics", "create", "events", "--name", "Events", "--opt-in").exit_code == 0
    listing = run(runner, "topics", "list").output
    assert "news\topt-out\tCompany news" in listing
    assert "events\topt-in\tEvents" in listing
    assert listing.startswith("transactional\talways sent")
    assert run(runner, "topics", "archive", "news").exit_code == 0
    assert "news\topt-out\tCompany news\tarchived" in run(runner, "topics", "list").output


def test_topic_errors_are_one_line_and_non_zero(runner, session):
    run(runner, "topics", "create", "news", "--name", "News")
    for args in (
        ("topics", "create", "news", "--name", "Again"),
        ("topics", "create", "transactional", "--name", "Nope"),
        ("topics", "create", "Bad Key", "--name", "Nope"),
        ("topics", "archive", "missing"),
    ):
        result = run(runner, *args)
        assert result.exit_code != 0
        assert result.output.strip().startswith("Error:")
        assert len(result.output.strip().splitlines()) == 1


def test_keys_create_prints_the_secret_once_and_stores_only_its_hash(runner, session):
    result = run(runner, "keys", "create", "mailer", "--scope", "send", "--scope", "read")
    assert result.exit_code == 0, result.output
    secret = last_line(result)
    assert secret.startswith("prefs_") and len(secret) > 40
    key = session.scalar(select(ApiKey))
    assert key.secret_hash == secret_hash(secret) and secret not in key.secret_hash
    assert key.scopes == "read send"
    listing = run(runner, "keys", "list").output
    assert "mailer\tread send\tactive" in listing and secret not in listing


def test_keys_duplicate_unknown_scope_and_revoke(runner, session):
    run(runner, "keys", "create", "mailer", "--scope", "send")
    duplicate = run(runner, "keys", "create", "mailer", "--scope", "send")
    assert duplicate.exit_code != 0 and "exists already" in duplicate.output
    assert run(runner, "keys", "create", "x", "--scope", "root").exit_code != 0
    assert run(runner, "keys", "revoke", "mailer").exit_code == 0
    assert "revoked" in run(runner, "keys", "list").output
    assert run(runner, "keys", "revoke", "missing").exit_code != 0


def test_link_prints_the_unsubscribe_then_the_preferences_url(runner, app, session):
    make_topic(session, "news")
    result = run(runner, "link", "Ann@Example.com", "--topic", "news", "--campaign", "c42")
    assert result.exit_code == 0, result.output
    unsubscribe, preferences = result.output.strip().splitlines()[-2:]
    assert unsubscribe.startswith("https://prefs.example.com/u/")
    assert preferences.startswith("https://prefs.example.com/p/")
    assert "ann" not in unsubscribe.lower() and "example.com/u/" in unsubscribe
    tokens = app.extensions["prefs.tokens"]
    named = tokens.read_unsubscribe(unsubscribe.rsplit("/", 1)[1])
    assert (named.topic, named.campaign) == ("news", "c42")
    assert tokens.read_preferences(preferences.rsplit("/", 1)[1]) == named.public_id


def test_link_errors(runner, session):
    assert run(runner, "link", "not-an-address").exit_code != 0
    result = run(runner, "link", "ann@example.com", "--topic", "missing")
    assert result.exit_code != 0 and "missing" in result.output


def test_check_unsubscribe_and_resubscribe(runner, session):
    make_topic(session, "news")
    assert last_line(run(runner, "check", "ann@example.com", "news")) == "allowed"
    assert run(runner, "unsubscribe", "ann@example.com", "--topic", "news").exit_code == 0
    assert last_line(run(runner, "check", "ann@example.com", "news")) == "suppressed unsubscribed"
    assert run(runner, "unsubscribe", "ANN@example.com").exit_code == 0
    assert last_line(run(runner, "check", "ann@example.com", "news")) == "suppressed unsubscribed_all"
    assert last_line(run(runner, "check", "ann@example.com", "transactional")) == "allowed"
    assert run(runner, "resubscribe", "ann@example.com").exit_code == 0
    assert last_line(run(runner, "check", "ann@example.com", "news")) == "suppressed unsubscribed"
    assert run(runner, "resubscribe", "ann@example.com", "--topic", "news").exit_code == 0
    assert last_line(run(runner, "check", "ann@example.com", "news")) == "allowed"
    sources = {e.source for e in session.scalars(select(Event))}
    assert sources == {"cli"}
    reasons = {e.reason for e in session.scalars(select(Event)) if e.topic_id is None and e.reason}
    assert reasons == {"support"}


def test_check_errors(runner, session):
    for args in (("check", "ann@example.com", "missing"), ("check", "bad", "transactional")):
        result = run(runner, *args)
        assert result.exit_code != 0 and result.output.startswith("Error:")


def test_unsubscribing_a_stranger_records_it(runner, session):
    make_topic(session, "news")
    assert run(runner, "unsubscribe", "new@example.com").exit_code == 0
    assert ledger.verdict_for(session, "new@example.com", "news").reason == "unsubscribed_all"


def flask_command(monkeypatch, tmp_path, *args):
    """Run ``flask --app prefs ARGS`` in process, as a shell would, with no base URL set."""
    monkeypatch.delenv("PREFS_BASE_URL", raising=False)
    env = {
        "PREFS_INSTANCE_PATH": str(tmp_path / "instance"),
        "PREFS_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "PREFS_SECRET_KEYS": "k" * 20,
    }
    return CliRunner().invoke(FlaskGroup(), ["--app", "prefs", *args], env=env)


def test_demo_builds_the_schema_and_prints_links_on_its_own_origin(monkeypatch, tmp_path):
    result = flask_command(monkeypatch, tmp_path, "demo", "--no-serve", "--port", "5057")
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:5057/u/" in result.output and "http://127.0.0.1:5057/p/" in result.output
    again = flask_command(monkeypatch, tmp_path, "demo", "--no-serve")
    assert again.exit_code == 0, again.output
    assert "http://127.0.0.1:5000/p/" in again.output


def test_every_other_command_refuses_to_run_without_a_base_url(monkeypatch, tmp_path):
    for args in (("link", "ann@example.com"), ("topics", "list"), ("routes",)):
        result = flask_command(monkeypatch, tmp_path, *args)
        assert result.exit_code != 0, (args, result.output)
        assert "PREFS_BASE_URL" in result.output, (args, result.output)


def test_smtpd_refuses_a_listen_address_without_a_port(runner, session):
    result = run(runner, "smtpd", "--listen", "localhost")
    assert result.exit_code != 0
    assert "HOST:PORT" in result.output


def test_smtpd_takes_a_certificate_and_its_key_or_neither(make_app, tmp_path):
    runner = make_app(UNSUBSCRIBE_MAILTO="unsubscribe@example.com").test_cli_runner()
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("not a certificate")
    result = run(runner, "smtpd", "--listen", "127.0.0.1:2525", "--tls-cert", str(not_pem))
    assert result.exit_code != 0 and "--tls-key" in result.output, result.output
    both = ("--tls-cert", str(not_pem), "--tls-key", str(not_pem))
    result = run(runner, "smtpd", "--listen", "127.0.0.1:2525", *both)
    assert result.exit_code != 0 and "cannot be used" in result.output, result.output
    assert "Traceback" not in result.output


def test_smtpd_receives_until_stopped(make_app, monkeypatch):
    import threading

    from prefs.mail import smtpd as receiver

    started = {}

    class Controller:
        def stop(self):
            started["stopped"] = True

    def start(app, host, port, tls=None):
        started["at"] = (host, port)
        return Controller()

    def interrupted(self, timeout=None):
        raise KeyboardInterrupt

    runner = make_app(UNSUBSCRIBE_MAILTO="unsubscribe@example.com").test_cli_runner()
    monkeypatch.setattr(receiver, "start", start)
    monkeypatch.setattr(threading.Event, "wait", interrupted)
    result = run(runner, "smtpd", "--listen", "127.0.0.1:2525")
    assert result.exit_code == 0, result.output
    assert started == {"at": ("127.0.0.1", 2525), "stopped": True}
    assert "receiving unsubscribe mail on 127.0.0.1:2525" in result.output


def test_resubscribe_lifts_a_hard_bounce_but_never_a_complaint(runner, session):
    make_topic(session, "news")
    ann = ledger.ensure_subscriber(session, "ann@example.com")
    bob = ledger.ensure_subscriber(session, "bob@example.com")
    ledger.record_opt_out(session, ann.public_id, None, ledger.Origin("api"), reason="complained")
    ledger.record_opt_out(session, bob.public_id, None, ledger.Origin("api"), reason="bounced")
    refused = run(runner, "resubscribe", "ann@example.com")
    assert refused.exit_code == 0
    assert "not resubscribed to all marketing: a complaint is lifted only by the person" in refused.output
    assert run(runner, "check", "ann@example.com", "news").output.strip() == "suppressed complained"
    lifted = run(runner, "resubscribe", "bob@example.com")
    assert lifted.output.strip() == "resubscribed to all marketing"
    assert run(runner, "check", "bob@example.com", "news").output.strip() == "allowed"


def test_recount_puts_counts_written_around_the_triggers_right(runner, session):
    from sqlalchemy import text

    from prefs.domain import overview
    from tests.factories import make_subscriber

    make_topic(session, "news")
    ann = make_subscriber(session, "ann@example.com")
    ledger.record_opt_out(session, ann.public_id, "news", ledger.Origin("cli"))
    # counts that drifted (rows written with the triggers off): ann is there, her choice is not
    session.execute(text("DELETE FROM audience_tallies"))
    session.commit()
    assert [(a.receiving, a.left) for a in overview.audiences(session)] == [(0, 0)]
    result = run(runner, "recount")
    assert result.exit_code == 0, result.output
    session.rollback()
    assert [(a.receiving, a.left) for a in overview.audiences(session)] == [(0, 1)]
