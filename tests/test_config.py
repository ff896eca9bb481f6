"""Settings: layers, defaults, and one clear line for a bad value."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefs import config, create_app
from prefs.config import ConfigError
from tests.disks import fill, small_disk

BASE_URL = "https://prefs.example.com"


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"DATABASE_URL": "not a url"}, "PREFS_DATABASE_URL"),
        ({"DATABASE_URL": "mysql://x@y/z"}, "PREFS_DATABASE_URL"),
        ({"SECRET_KEYS": "good-key-0123456789,,"}, "PREFS_SECRET_KEYS"),
        ({"SECRET_KEYS": "short"}, "PREFS_SECRET_KEYS"),
        ({"BASE_URL": "prefs.example.com"}, "PREFS_BASE_URL"),
        ({"BASE_URL": "https://prefs.example.com/?x=1"}, "PREFS_BASE_URL"),
        ({"DB_POOL_SIZE": "many"}, "PREFS_DB_POOL_SIZE"),
        ({"DB_POOL_SIZE": 0}, "PREFS_DB_POOL_SIZE"),
        ({"TOKEN_MAX_AGE": "soon"}, "PREFS_TOKEN_MAX_AGE"),
        ({"RATELIMIT_TIMEOUT_MS": 0}, "PREFS_RATELIMIT_TIMEOUT_MS"),
        ({"RATELIMIT_TIMEOUT_MS": "fast"}, "PREFS_RATELIMIT_TIMEOUT_MS"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(make_app, settings, variable):
    with pytest.raises(ConfigError) as err:
        make_app(**settings)
    message = str(err.value)
    assert variable in message and "\n" not in message


def test_environment_variables_are_read(monkeypatch, make_app):
    monkeypatch.setenv("PREFS_BASE_URL", "https://mail.example.org/")
    monkeypatch.setenv("PREFS_DB_POOL_SIZE", "7")
    app = create_app({"SECRET_KEYS": "k" * 20, "DATABASE_URL": "sqlite://"})
    assert app.config["BASE_URL"] == "https://mail.example.org"
    assert app.config["DB_POOL_SIZE"] == 7


def test_a_service_without_a_base_url_stops_at_start_with_one_line_naming_it(monkeypatch):
    # links in mail would otherwise be built from what a request says its Host is
    monkeypatch.delenv("PREFS_BASE_URL", raising=False)
    with pytest.raises(ConfigError) as err:
        create_app({"SECRET_KEYS": "k" * 20, "DATABASE_URL": "sqlite://"})
    message = str(err.value)
    assert "PREFS_BASE_URL" in message and "\n" not in message


def test_the_tests_make_do_without_a_base_url_and_never_use_the_host(make_app):
    app = make_app(BASE_URL=None)
    with app.test_request_context("/", headers={"Host": "attacker.example"}):
        from prefs.web import links

        assert "attacker" not in links.preferences_url("t")


@pytest.mark.parametrize(
    "value",
    [
        "https://www.prefs.example.com",
        "www.prefs.example.com/x",
        "prefs.example.com, bad host",
        ",",
        "a@b.example",
    ],
)
def test_a_bad_trusted_host_is_one_line_naming_the_variable(make_app, value):
    with pytest.raises(ConfigError) as err:
        make_app(TRUSTED_HOSTS=value)
    assert "PREFS_TRUSTED_HOSTS" in str(err.value) and "\n" not in str(err.value)


def test_a_base_url_with_credentials_is_refused(make_app):
    with pytest.raises(ConfigError, match="PREFS_BASE_URL"):
        make_app(BASE_URL="https://user:pw@prefs.example.com")


def test_the_test_mapping_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("PREFS_BRAND_NAME", "From env")
    app = create_app(
        {"SECRET_KEYS": "k" * 20, "DATABASE_URL": "sqlite://", "BRAND_NAME": "Test", "BASE_URL": BASE_URL}
    )
    assert app.config["BRAND_NAME"] == "Test"


def test_secret_keys_are_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("PREFS_SECRET_KEYS", "old-key-0123456789, new-key-0123456789")
    app = create_app({"DATABASE_URL": "sqlite://", "BASE_URL": BASE_URL})
    assert app.config["SECRET_KEYS"] == ["old-key-0123456789", "new-key-0123456789"]


def test_without_keys_one_is_generated_once_into_the_instance_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path))
    monkeypatch.delenv("PREFS_SECRET_KEYS", raising=False)
    first = create_app({"DATABASE_URL": "sqlite://", "BASE_URL": BASE_URL})
    assert "PREFS_SECRET_KEYS is not set" in caplog.text
    second = create_app({"DATABASE_URL": "sqlite://", "BASE_URL": BASE_URL})
    assert first.config["SECRET_KEYS"] == second.config["SECRET_KEYS"]
    assert (tmp_path / "secret_keys").stat().st_mode & 0o077 == 0


def test_a_full_instance_disk_without_keys_is_one_clear_line_and_leaves_no_half_key(tmp_path, monkeypatch):
    with small_disk(tmp_path / "instance", size="64k") as instance:
        fill(instance)
        monkeypatch.setenv("PREFS_INSTANCE_PATH", str(instance))
        monkeypatch.delenv("PREFS_SECRET_KEYS", raising=False)
        with pytest.raises(ConfigError) as err:
            create_app({"DATABASE_URL": "sqlite://", "BASE_URL": "https://prefs.example.com"})
        message = str(err.value)
        assert "PREFS_SECRET_KEYS" in message and "\n" not in message
        assert sorted(p.name for p in instance.iterdir()) == ["filler"]


@pytest.mark.parametrize("left", ["", "\n", "short\n"])
def test_a_key_file_cut_short_is_never_used_as_a_key(tmp_path, monkeypatch, left):
    # what a write cut by a full disk (or a crash) leaves: nothing, or less than a key
    (tmp_path / "secret_keys").write_text(left)
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path))
    monkeypatch.delenv("PREFS_SECRET_KEYS", raising=False)
    with pytest.raises(ConfigError) as err:
        create_app({"DATABASE_URL": "sqlite://", "BASE_URL": "https://prefs.example.com"})
    assert "PREFS_SECRET_KEYS" in str(err.value) and "secret_keys" in str(err.value)


def test_the_default_database_is_sqlite_in_the_instance_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path))
    monkeypatch.delenv("PREFS_DATABASE_URL", raising=False)
    app = create_app({"SECRET_KEYS": "k" * 20, "BASE_URL": BASE_URL})
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path / 'prefs.sqlite3'}"


def test_plain_postgresql_urls_use_psycopg_3():
    app = create_app(
        {"SECRET_KEYS": "k" * 20, "DATABASE_URL": "postgresql://u@127.0.0.1/p", "BASE_URL": BASE_URL}
    )
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u@127.0.0.1/p"
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_size"] == 5
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is True


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"BRAND_COLOR": "blue"}, "PREFS_BRAND_COLOR"),
        ({"BRAND_COLOR": "#12345"}, "PREFS_BRAND_COLOR"),
        ({"BRAND_COLOR": "#12345g"}, "PREFS_BRAND_COLOR"),
        ({"BRAND_NAME": "  "}, "PREFS_BRAND_NAME"),
        ({"SMTP_URL": "mail.example.com"}, "PREFS_SMTP_URL"),
        ({"SMTP_URL": "smtp://mail.example.com:twentyfive"}, "PREFS_SMTP_URL"),
        ({"SMTP_URL": "smtps://mail.example.com?starttls=1"}, "PREFS_SMTP_URL"),
        ({"MAIL_FROM": "nobody"}, "PREFS_MAIL_FROM"),
        ({"MAIL_FROM": "a@b.example\r\nBcc: x@y.example"}, "PREFS_MAIL_FROM"),
        ({"SMTP_TIMEOUT": "soon"}, "PREFS_SMTP_TIMEOUT"),
        ({"RATELIMIT_STORAGE_URI": "mysql://x"}, "PREFS_RATELIMIT_STORAGE_URI"),
        ({"RATELIMIT_PER_CLIENT": "lots"}, "PREFS_RATELIMIT_PER_CLIENT"),
        ({"RATELIMIT_PER_ADDRESS": ""}, "PREFS_RATELIMIT_PER_ADDRESS"),
        ({"RATELIMIT_ONE_CLICK": 5}, "PREFS_RATELIMIT_ONE_CLICK"),
        ({"TRUSTED_PROXIES": "some"}, "PREFS_TRUSTED_PROXIES"),
        ({"REQUEST_MIN_SECONDS": -1}, "PREFS_REQUEST_MIN_SECONDS"),
        ({"TRUSTED_PROXIES": -1}, "PREFS_TRUSTED_PROXIES"),
    ],
)
def test_a_bad_public_setting_is_one_line_naming_the_variable(make_app, settings, variable):
    with pytest.raises(ConfigError) as err:
        make_app(**settings)
    assert variable in str(err.value) and "\n" not in str(err.value)


def test_public_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("PREFS_SMTP_URL", "smtps://u:p@mail.example.com")
    monkeypatch.setenv("PREFS_RATELIMIT_STORAGE_URI", "redis://127.0.0.1:6379/2")
    monkeypatch.setenv("PREFS_BRAND_COLOR", "#FFCC00")
    app = create_app({"SECRET_KEYS": "k" * 20, "DATABASE_URL": "sqlite://", "BASE_URL": BASE_URL})
    assert app.config["SMTP_SERVER"].tls and app.config["SMTP_SERVER"].port == 465
    # the limiter's storage: that Redis, skipped while it does not answer in time (ratelimit.py)
    assert app.config["RATELIMIT_STORAGE_URI"] == "prefs+redis://127.0.0.1:6379/2"
    assert app.config["BRAND_COLOR"] == "#ffcc00"


@pytest.mark.parametrize(
    ("color", "text", "link"),
    [
        ("#1d4ed8", "#ffffff", "#1d4ed8"),
        ("#ffcc00", "#000000", "#1a1a1a"),
        ("#000000", "#ffffff", "#000000"),
        ("#ffffff", "#000000", "#1a1a1a"),
        ("#767676", "#000000", "#767676"),  # 4.62:1 on black beats 4.54:1 on white
    ],
)
def test_text_on_the_accent_is_white_or_black_by_luminance(color, text, link):
    app = create_app(
        {"SECRET_KEYS": "k" * 20, "DATABASE_URL": "sqlite://", "BRAND_COLOR": color, "BASE_URL": BASE_URL}
    )
    assert app.config["BRAND_TEXT_COLOR"] == text
    assert app.config["BRAND_LINK_COLOR"] == link


@given(st.integers(min_value=0, max_value=0xFFFFFF))
def test_every_accent_colour_keeps_text_at_4_5_to_1(value):
    color = f"#{value:06x}"
    settings = {"BRAND_COLOR": color, "BRAND_NAME": "x"}
    config._brand(settings)
    assert config.contrast(color, settings["BRAND_TEXT_COLOR"]) >= 4.5
    assert config.contrast(settings["BRAND_LINK_COLOR"], "#ffffff") >= 4.5


def test_the_contrast_ratio_matches_wcag():
    assert round(config.contrast("#000000", "#ffffff"), 2) == 21.0
    assert round(config.contrast("#767676", "#ffffff"), 2) == 4.54


@pytest.mark.parametrize(
    "value",
    [
        "https://prefs.example.com/\r\nBcc: all@example.com",
        "https://prefs.example.com/a b",
        "https://prefs.exa mple.com",
        "https://prefs.example.com/\tx",
        "https://prefs.example.com/>, <https://attacker.example",
        'https://prefs.example.com/"onmouseover=x',
        "https://prefs.example.com/<script>",
        "https://prefs.example.com:0",
        "https://-prefs.example.com",
        "https://prefs_example.com",
        "https://prefs.example.com/%zz",
    ],
)
def test_a_base_url_a_mail_header_or_a_link_could_not_carry_is_refused(make_app, value):
    # links built on it go into List-Unsubscribe headers and plain-text mail as they are
    with pytest.raises(ConfigError) as err:
        make_app(BASE_URL=value)
    assert "PREFS_BASE_URL" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (" https://prefs.example.com\r\n", "https://prefs.example.com"),
        ("HTTPS://Prefs.Example.COM/", "https://prefs.example.com"),
        ("https://bücher.example/prefs/", "https://xn--bcher-kva.example/prefs"),
        ("https://prefs.example.com:8443/a%20b/", "https://prefs.example.com:8443/a%20b"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_a_base_url_is_kept_in_the_one_form_links_and_hosts_agree_on(make_app, value, stored):
    assert make_app(BASE_URL=value).config["BASE_URL"] == stored


@pytest.mark.parametrize(
    "value",
    [
        "un#sub@example.com",
        "un%sub@example.com",
        "ünsub@example.com",
        "un&sub@example.com",
        "un/sub@example.com",
    ],
)
def test_an_unsubscribe_mailbox_a_mailto_link_could_not_carry_is_refused(make_app, value):
    # it goes into List-Unsubscribe as mailto:<address>?subject=...: RFC 6068 reserves # % & / there
    with pytest.raises(ConfigError) as err:
        make_app(UNSUBSCRIBE_MAILTO=value)
    assert "PREFS_UNSUBSCRIBE_MAILTO" in str(err.value) and "\n" not in str(err.value)
