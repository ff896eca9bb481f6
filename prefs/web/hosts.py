"""The hosts the service answers for: its base URL's, and those ``PREFS_TRUSTED_HOSTS`` lists.

Links are built on ``PREFS_BASE_URL`` alone (``links.py``), never on what a request says its
host is. A request for any other host gets a 400, so nothing (a redirect, a cache in front,
a page) can be made to speak for a host the operator did not name. The probes answer
whatever the host: a load balancer addresses a backend by its own address.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING
from urllib.parse import SplitResult

from flask import current_app, request
from werkzeug.exceptions import BadRequest

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment

# RFC 3986's host (a name, IPv4, or an IPv6 literal) and an optional port, nothing else
_HOST = re.compile(r"([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?", re.ASCII | re.IGNORECASE)
# the probes: /healthz and /metrics
ANY_HOST = frozenset({"health.healthz", "monitoring.metrics"})


class UnknownHost(BadRequest):
    """The request names a host the service does not serve."""

    description = "This service does not answer for that host name."


def host_name(value: str | None) -> str | None:
    """Return the host a ``Host`` value names (lower case, no port, no final dot), or None."""
    if not value:
        return None
    match = _HOST.fullmatch(value)
    if match is None:
        return None
    name, port = match.groups()
    if port and not 0 < int(port) < 65536:
        return None
    return _canonical(name)


def _canonical(name: str) -> str | None:
    if name.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(name[1:-1]).compressed}]"
        except ValueError:
            return None
    # a final dot names the same host (the DNS root)
    name = name.lower().removesuffix(".")
    return name if name and ".." not in name and not name.startswith(".") else None


def listed_host(entry: str) -> str | None:
    """Return the host of a ``PREFS_TRUSTED_HOSTS`` entry (a name or address, no port), or None."""
    entry = entry.strip()
    try:
        return f"[{ipaddress.IPv6Address(entry).compressed}]"
    except ValueError:
        pass
    match = _HOST.fullmatch(entry)
    if match is None or match.group(2) is not None:
        return None
    return _canonical(match.group(1))


def url_host(parts: SplitResult) -> str | None:
    """Return the host of a parsed URL as a ``Host`` header names it (IDNA, lower case)."""
    name = parts.hostname
    if not name:
        return None
    if ":" in name:
        return _canonical(f"[{name}]")
    try:
        return _canonical(name.encode("idna").decode("ascii"))
    except UnicodeError:
        return None


def serves(environ: WSGIEnvironment, allowed: frozenset[str]) -> bool:
    """Tell whether a request names one of the allowed hosts."""
    return host_name(environ.get("HTTP_HOST")) in allowed


def refuse_unknown() -> None:
    """Answer 400 to a request for a host the service does not serve; the probes answer any."""
    if request.endpoint in ANY_HOST:
        return
    if not serves(request.environ, current_app.config["ALLOWED_HOSTS"]):
        raise UnknownHost()
