"""Build the public links, on the configured origin or the request's own."""

from __future__ import annotations

from flask import current_app, has_request_context, request

from .tokens import Tokens

FALLBACK_ORIGIN = "http://127.0.0.1:5000"


def tokens() -> Tokens:
    """Return the application's token service."""
    service: Tokens = current_app.extensions["prefs.tokens"]
    return service


def base_url() -> str:
    """Return the public origin every generated link starts with."""
    configured: str | None = current_app.config["BASE_URL"]
    if configured:
        return configured
    if has_request_context():
        return request.host_url.rstrip("/")
    return FALLBACK_ORIGIN


def unsubscribe_url(token: str) -> str:
    """Return the link of an unsubscribe token."""
    return f"{base_url()}/u/{token}"


def preferences_url(token: str) -> str:
    """Return the preference-center link of a token."""
    return f"{base_url()}/p/{token}"
