"""Read and check the ``PREFS_*`` settings."""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Config
from limits import parse_many

from . import keyfile
from .mail.outbound import check_sender, parse_smtp_url
from .web import hosts

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,
    "SECRET_KEYS": None,
    "BASE_URL": None,
    "TRUSTED_HOSTS": None,
    "DB_POOL_SIZE": 5,
    "DB_POOL_TIMEOUT": 2.0,
    "DB_BUSY_TIMEOUT_MS": 5000,
    # a PostgreSQL round trip not answered in this long, in a web worker: the server is taken for hung
    "DB_STALL_MS": 10000,
    "TOKEN_MAX_AGE": None,
    "BRAND_NAME": "prefs",
    "BRAND_COLOR": "#1d4ed8",
    "MAX_BODY_BYTES": 4 * 1024 * 1024,
    "UNSUBSCRIBE_MAILTO": None,
    "INBOUND_AUTHSERV_ID": None,
    "SMTP_URL": None,
    "SMTP_TIMEOUT": 10.0,
    "MAIL_FROM": "prefs <no-reply@localhost>",
    "RATELIMIT_STORAGE_URI": "memory://",
    "RATELIMIT_PER_CLIENT": "10 per hour; 30 per day",
    "RATELIMIT_PER_ADDRESS": "3 per hour; 6 per day",
    "RATELIMIT_ONE_CLICK": "60 per minute",
    "RATELIMIT_API_KEY": "1200 per minute",
    "RATELIMIT_TIMEOUT_MS": 100,
    "TRUSTED_PROXIES": 0,
    "REQUEST_MIN_SECONDS": 0.25,
    "METRICS_TOKEN": None,
    "LOG_LEVEL": "INFO",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_COLOR = re.compile(r"#[0-9a-fA-F]{6}\Z")
# the storages Flask-Limiter can reach with what setup.cfg installs
_LIMIT_STORAGES = ("memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster")
_LIMIT_SETTINGS = (
    "RATELIMIT_PER_CLIENT",
    "RATELIMIT_PER_ADDRESS",
    "RATELIMIT_ONE_CLICK",
    "RATELIMIT_API_KEY",
)


# what a service on the network must be told, and why; the tests and the demo go without
REQUIRED = {
    "BASE_URL": "to the public origin of the links mailed, e.g. https://prefs.example.com "
    "(a request's Host header never decides them)",
}
# the origin ``flask --app prefs demo`` serves on, while it loads the app; the demo is the one
# command that may run without REQUIRED (it serves one person on loopback)
DEMO_ORIGIN: ContextVar[str | None] = ContextVar("prefs_demo_origin", default=None)
# links the tests build without a base URL: the test client's own host
TEST_ORIGIN = "http://localhost"
# anyone may type either for the demo on loopback
_DEMO_HOSTS = ("localhost", "127.0.0.1")


class ConfigError(SystemExit):
    """A setting is missing or malformed; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"prefs: configuration error: PREFS_{variable} {problem}")


def instance_path() -> str:
    """Return the instance folder: ``PREFS_INSTANCE_PATH``, or ``instance/`` beside the code."""
    return os.environ.get("PREFS_INSTANCE_PATH") or str(ROOT / "instance")


def layered(instance_path: str) -> Config:
    """Return the settings' layers: the defaults, then ``instance/prefs.cfg``, then ``PREFS_*``."""
    settings = Config(instance_path, DEFAULTS)
    settings.from_pyfile("prefs.cfg", silent=True)
    settings.from_prefixed_env("PREFS")
    return settings


def service_settings() -> dict[str, Any]:
    """Return the checked settings a service starts with; a bad one raises ``ConfigError``."""
    folder = instance_path()
    settings = dict(layered(folder))
    finish(settings, folder)
    return settings


def finish(config: dict[str, Any], instance_path: str) -> None:
    """Check the loaded settings and derive the values the extensions read."""
    demo = DEMO_ORIGIN.get()
    if demo and config.get("BASE_URL") in (None, ""):
        config["BASE_URL"] = demo
    if not (config.get("TESTING") or demo):
        _require(config)
    config["SECRET_KEYS"] = _secret_keys(config.get("SECRET_KEYS"), instance_path)
    config["BASE_URL"] = _base_url(config.get("BASE_URL")) or TEST_ORIGIN
    config["ALLOWED_HOSTS"] = _allowed_hosts(config["BASE_URL"], config.get("TRUSTED_HOSTS"), bool(demo))
    # Flask checks TRUSTED_HOSTS itself, and would refuse /healthz too: prefs checks (hosts.py)
    config["TRUSTED_HOSTS"] = None
    config["DB_POOL_SIZE"] = _positive_int(config, "DB_POOL_SIZE")
    config["DB_BUSY_TIMEOUT_MS"] = _positive_int(config, "DB_BUSY_TIMEOUT_MS")
    config["DB_STALL_MS"] = _positive_int(config, "DB_STALL_MS")
    config["MAX_BODY_BYTES"] = _positive_int(config, "MAX_BODY_BYTES")
    config["DB_POOL_TIMEOUT"] = _positive_number(config, "DB_POOL_TIMEOUT")
    max_age = config.get("TOKEN_MAX_AGE")
    config["TOKEN_MAX_AGE"] = None if max_age in (None, "", 0) else _positive_int(config, "TOKEN_MAX_AGE")
    config["UNSUBSCRIBE_MAILTO"] = _mailto(config.get("UNSUBSCRIBE_MAILTO"))
    config["SQLALCHEMY_DATABASE_URI"] = database_url(config.get("DATABASE_URL"), instance_path)
    config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(config)
    config["MAX_CONTENT_LENGTH"] = config["MAX_BODY_BYTES"]
    if config.get("TRUSTED_PROXIES") in (0, "0", None, ""):
        config["TRUSTED_PROXIES"] = 0
    else:
        config["TRUSTED_PROXIES"] = _positive_int(config, "TRUSTED_PROXIES")
    _brand(config)
    _mail(config)
    _rate_limits(config)
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
        # lock_timeout: a row another session holds (an operator's psql, a migration) makes a
        # write fail after the busy timeout, as on SQLite, instead of hanging until the worker dies
        "connect_args": {
            "connect_timeout": 2,
            "options": f"-c lock_timeout={int(config['DB_BUSY_TIMEOUT_MS'])}",
        },
    }


def _brand(config: dict[str, Any]) -> None:
    name = config.get("BRAND_NAME")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("BRAND_NAME", "must be a name to show on the pages")
    color = config.get("BRAND_COLOR")
    if not isinstance(color, str) or not _COLOR.match(color.strip()):
        raise ConfigError("BRAND_COLOR", f"must be a colour written #rrggbb, such as #1d4ed8, not {color!r}")
    color = color.strip().lower()
    config["BRAND_NAME"] = name.strip()
    config["BRAND_COLOR"] = color
    # text on the accent keeps at least 4.5:1: white or black, whichever contrasts more
    on_white, on_black = contrast(color, "#ffffff"), contrast(color, "#000000")
    config["BRAND_TEXT_COLOR"] = "#ffffff" if on_white >= on_black else "#000000"
    # links sit on white: the accent only where it is dark enough for body text
    config["BRAND_LINK_COLOR"] = color if on_white >= 4.5 else "#1a1a1a"


def luminance(color: str) -> float:
    """Return the WCAG relative luminance of a ``#rrggbb`` colour."""
    channels = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(first: str, second: str) -> float:
    """Return the WCAG contrast ratio of two ``#rrggbb`` colours."""
    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def _mail(config: dict[str, Any]) -> None:
    url = config.get("SMTP_URL")
    if url in (None, ""):
        config["SMTP_SERVER"] = None
    else:
        try:
            config["SMTP_SERVER"] = parse_smtp_url(str(url))
        except ValueError as err:
            raise ConfigError("SMTP_URL", str(err)) from None
    try:
        config["MAIL_FROM"] = check_sender(str(config.get("MAIL_FROM") or ""))
    except ValueError as err:
        raise ConfigError("MAIL_FROM", str(err)) from None
    config["SMTP_TIMEOUT"] = _positive_number(config, "SMTP_TIMEOUT")
    floor = config.get("REQUEST_MIN_SECONDS")
    config["REQUEST_MIN_SECONDS"] = (
        0.0 if floor in (0, "0") else _positive_number(config, "REQUEST_MIN_SECONDS")
    )


def _rate_limits(config: dict[str, Any]) -> None:
    storage = config.get("RATELIMIT_STORAGE_URI")
    if not isinstance(storage, str) or storage.partition("://")[0] not in _LIMIT_STORAGES:
        raise ConfigError(
            "RATELIMIT_STORAGE_URI", f"must be memory:// or redis://host:6379 (or rediss://), not {storage!r}"
        )
    for name in _LIMIT_SETTINGS:
        value = config.get(name)
        try:
            if not isinstance(value, str) or not parse_many(value):
                raise ValueError
        except ValueError:
            problem = f"must be a rate such as '3 per hour; 6 per day', not {value!r}"
            raise ConfigError(name, problem) from None
    config["RATELIMIT_TIMEOUT_MS"] = _positive_int(config, "RATELIMIT_TIMEOUT_MS")


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
        try:
            return [keyfile.generated_key(instance_path)]
        except keyfile.KeyFileError as err:
            raise ConfigError("SECRET_KEYS", str(err)) from None
    else:
        raise ConfigError("SECRET_KEYS", "must be a comma-separated list of keys")
    if not keys or any(not k for k in keys):
        raise ConfigError("SECRET_KEYS", "has an empty key: list keys separated by commas")
    if any(len(k) < 16 for k in keys):
        raise ConfigError("SECRET_KEYS", "has a key shorter than 16 characters")
    return keys


def _require(config: dict[str, Any]) -> None:
    for name, why in REQUIRED.items():
        if config.get(name) in (None, ""):
            raise ConfigError(name, f"is not set: set it {why}")


# links are built on the base URL as it is, into pages, plain-text mail and List-Unsubscribe
# headers: its path holds only what none of them needs to escape (no space, quote, <>, comma)
_URL_PATH = re.compile(r"(?:/(?:[A-Za-z0-9._~!$&*+;=:@-]|%[0-9A-Fa-f]{2})*)*\Z")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def _base_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    # an env file's line end or padding is no part of it; anything else unprintable is refused
    text = str(value).strip()
    parts = urlsplit(text)
    try:
        port = parts.port
        host = hosts.url_host(parts)
    except ValueError:
        port, host = None, None
    if (
        any(c.isspace() or not c.isprintable() for c in text)
        or parts.scheme not in ("http", "https")
        or host is None
        or not (host.startswith("[") or all(_HOST_LABEL.match(label) for label in host.split(".")))
        or port == 0
        or parts.username is not None
        or parts.query
        or parts.fragment
        or "?" in text
        or "#" in text
        or not _URL_PATH.match(parts.path)
    ):
        raise ConfigError("BASE_URL", "must be an http(s) origin such as https://prefs.example.com")
    # one form: lower-case scheme and host, the host in ASCII (IDNA), no final slash
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _allowed_hosts(base_url: str, trusted: Any, demo: bool) -> frozenset[str]:
    """Return the hosts the service answers for: the base URL's, the trusted ones, the demo's."""
    if trusted in (None, ""):
        listed: list[str] = []
    elif isinstance(trusted, str):
        listed = trusted.split(",")
    elif isinstance(trusted, list | tuple | set | frozenset):
        listed = [str(t) for t in trusted]
    else:
        raise ConfigError("TRUSTED_HOSTS", "must be a comma-separated list of host names")
    names = {hosts.url_host(urlsplit(base_url))}
    for entry in listed:
        name = hosts.listed_host(entry)
        if name is None:
            problem = f"must list host names such as www.prefs.example.com, 10.0.0.7, not {entry.strip()!r}"
            raise ConfigError("TRUSTED_HOSTS", problem)
        names.add(name)
    if demo:
        names.update(_DEMO_HOSTS)
    return frozenset(n for n in names if n)


_MAILTO_LOCAL = re.compile(r"[a-z0-9_+-]+(?:\.[a-z0-9_+-]+)*\Z")


def _mailto(value: Any) -> str | None:
    if value in (None, ""):
        return None
    from .domain.addresses import normalize_or_none

    address = normalize_or_none(str(value))
    # it is written into List-Unsubscribe as mailto:<address>?subject=...: a local part of
    # what RFC 6068 leaves unescaped there (no ? # % & /, no quote, ASCII), as a mailbox is named
    if address is None or not _MAILTO_LOCAL.match(address.rpartition("@")[0]) or not address.isascii():
        raise ConfigError("UNSUBSCRIBE_MAILTO", "must be a plain address such as unsubscribe@example.com")
    return address


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
