"""Settings: layers, defaults, and one clear line for a bad value."""

import pytest

from prefs import create_app
from prefs.config import ConfigError


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


def test_the_test_mapping_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("PREFS_BRAND_NAME", "From env")
    app = create_app({"SECRET_KEYS": "k" * 20, "DATABASE_URL": "sqlite://", "BRAND_NAME": "Test"})
    assert app.config["BRAND_NAME"] == "Test"


def test_secret_keys_are_a_comma_separated_list(monkeypatch):
    monkeypatch.setenv("PREFS_SECRET_KEYS", "old-key-0123456789, new-key-0123456789")
    app = create_app({"DATABASE_URL": "sqlite://"})
    assert app.config["SECRET_KEYS"] == ["old-key-0123456789", "new-key-0123456789"]


def test_without_keys_one_is_generated_once_into_the_instance_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path))
    monkeypatch.delenv("PREFS_SECRET_KEYS", raising=False)
    first = create_app({"DATABASE_URL": "sqlite://"})
    assert "PREFS_SECRET_KEYS is not set" in caplog.text
    second = create_app({"DATABASE_URL": "sqlite://"})
    assert first.config["SECRET_KEYS"] == second.config["SECRET_KEYS"]
    assert (tmp_path / "secret_keys").stat().st_mode & 0o077 == 0


def test_the_default_database_is_sqlite_in_the_instance_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFS_INSTANCE_PATH", str(tmp_path))
    monkeypatch.delenv("PREFS_DATABASE_URL", raising=False)
    app = create_app({"SECRET_KEYS": "k" * 20})
    assert app.config["SQLALCHEMY_DATABASE_URI"] == f"sqlite:///{tmp_path / 'prefs.sqlite3'}"


def test_plain_postgresql_urls_use_psycopg_3():
    app = create_app({"SECRET_KEYS": "k" * 20, "DATABASE_URL": "postgresql://u@127.0.0.1/p"})
    assert app.config["SQLALCHEMY_DATABASE_URI"] == "postgresql+psycopg://u@127.0.0.1/p"
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_size"] == 5
    assert app.config["SQLALCHEMY_ENGINE_OPTIONS"]["pool_pre_ping"] is True
