"""Read and check the ``PREFS_*`` settings."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,
    "SECRET_KEYS": None,
    "BASE_URL": None,
    "DB_POOL_SIZE": 5,
    "DB_POOL_TIMEOUT": 2.0,
    "DB_BUSY_TIMEOUT_MS": 5000,
    "TOKEN_MAX_AGE": None,
    "BRAND_NAME": "prefs",
    "BRAND_COLOR": "#1d4ed8",
    "MAX_BODY_BYTES": 4 * 1024 * 1024,
    "METRICS_TOKEN": None,
    "LOG_LEVEL": "INFO",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

KEY_FILE = "secret_keys"


class ConfigError(SystemExit):
    """A setting is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"prefs: configuration error: PREFS_{variable} {problem}")


def finish(config: dict[str, Any], instance_path: str) -> None:
    """Check the loaded settings and derive the values the extensions read."""
    config["SECRET_KEYS"] = _secret_keys(config.get("SECRET_KEYS"), instance_path)
    config["BASE_URL"] = _base_url(config.get("BASE_URL"))
    config["DB_POOL_SIZE"] = _positive_int(config, "DB_POOL_SIZE")
    config["DB_BUSY_TIMEOUT_MS"] = _positive_int(config, "DB_BUSY_TIMEOUT_MS")
    config["MAX_BODY_BYTES"] = _positive_int(config, "MAX_BODY_BYTES")
    config["DB_POOL_TIMEOUT"] = _positive_number(config, "DB_POOL_TIMEOUT")
    max_age = config.get("TOKEN_MAX_AGE")
    config["TOKEN_MAX_AGE"] = None if max_age in (None, "", 0) else _positive_int(config, "TOKEN_MAX_AGE")
    config["SQLALCHEMY_DATABASE_URI"] = database_url(config.get("DATABASE_URL"), instance_path)
    config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(config)
    config["MAX_CONTENT_LENGTH"] = config["MAX_BODY_BYTES"]
    config["METRICS_TOKEN"] = _metrics_token(config.get("METRICS_TOKEN"))
    config["LOG_LEVEL"] = log_level(config.get("LOG_LEVEL"))
    # flask's own session is unused; this keeps its key distinct from the signing keys
    config.setdefault("SECRET_KEY", config["SECRET_KEYS"][-1])


def database_url(value: Any, instance_path: str) -> str:
    """Return the SQLAlchemy URL, defaulting to a SQLite file in the instance folder."""
    if value in (None, ""):
        os.makedirs(instance_path, exist_ok=True)
        return "sqlite:///" + str(Path(instance_path) / "prefs.sqlite3")
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError("DATABASE_URL", "must be a SQLAlchemy URL such as sqlite:///prefs.sqlite3")
    scheme = value.split("://", 1)[0]
    # psycopg 3 is the driver we ship; plain postgresql:// would ask for psycopg2
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if scheme not in ("sqlite", "postgresql+psycopg"):
        raise ConfigError("DATABASE_URL", f"has unsupported scheme {scheme!r}: use sqlite or postgresql")
    return value


def engine_options(config: dict[str, Any]) -> dict[str, Any]:
    """Return the engine options for the configured database."""
    url: str = config["SQLALCHEMY_DATABASE_URI"]
    # a failed statement's message must not carry its parameters (addresses) into the logs
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": config["DB_BUSY_TIMEOUT_MS"] / 1000}, "hide_parameters": True}
    return {
        "hide_parameters": True,
        "pool_size": config["DB_POOL_SIZE"],
        "max_overflow": 0,
        "pool_timeout": config["DB_POOL_TIMEOUT"],
        "pool_pre_ping": True,
        "pool_recycle": 1800,
        "connect_args": {"connect_timeout": 2},
    }


def log_level(value: Any) -> str:
    """Return a checked log level name."""
    level = str(value or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return level


def _metrics_token(value: Any) -> str | None:
    if value in (None, ""):
        return None
    token = str(value).strip()
    if len(token) < 16:
        raise ConfigError("METRICS_TOKEN", "must be at least 16 characters")
    return token


def _secret_keys(value: Any, instance_path: str) -> list[str]:
    if isinstance(value, list | tuple):
        keys = [str(k).strip() for k in value]
    elif isinstance(value, str):
        keys = [k.strip() for k in value.split(",")]
    elif value is None:
        return [_generated_key(instance_path)]
    else:
        raise ConfigError("SECRET_KEYS", "must be a comma-separated list of keys")
    if not keys or any(not k for k in keys):
        raise ConfigError("SECRET_KEYS", "has an empty key: list keys separated by commas")
    if any(len(k) < 16 for k in keys):
        raise ConfigError("SECRET_KEYS", "has a key shorter than 16 characters")
    return keys


def _generated_key(instance_path: str) -> str:
    path = Path(instance_path) / KEY_FILE
    if path.exists():
        return path.read_text().strip().split(",")[-1]
    os.makedirs(instance_path, exist_ok=True)
    key = secrets.token_urlsafe(32)
    # O_EXCL: two workers starting at once must agree on one key
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip().split(",")[-1]
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.warning("PREFS_SECRET_KEYS is not set: generated a signing key in %s", path)
    return key


def _base_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError("BASE_URL", "must be an http(s) origin such as https://prefs.example.com")
    return str(value).rstrip("/")


def _positive_int(config: dict[str, Any], name: str) -> int:
    value = config.get(name)
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(name, f"must be a whole number, not {value!r}") from None
    if number <= 0 or isinstance(value, float | bool):
        raise ConfigError(name, f"must be a positive whole number, not {value!r}")
    return number


def _positive_number(config: dict[str, Any], name: str) -> float:
    value = config.get(name)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(name, f"must be a number, not {value!r}") from None
    if number <= 0:
        raise ConfigError(name, f"must be positive, not {value!r}")
    return number
