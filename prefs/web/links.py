"""Build the public links, always on the configured origin (``PREFS_BASE_URL``)."""

from __future__ import annotations

from flask import current_app

from ..domain.tokens import Tokens


def tokens() -> Tokens:
    """Return the application's token service."""
    service: Tokens = current_app.extensions["prefs.tokens"]
    return service


def base_url() -> str:
    """Return the public origin every generated link starts with; a request's Host never decides it."""
    configured: str = current_app.config["BASE_URL"]
    return configured


def unsubscribe_url(token: str) -> str:
    """Return the link of an unsubscribe token."""
    return f"{base_url()}/u/{token}"


def preferences_url(token: str) -> str:
    """Return the preference-center link of a token."""
    return f"{base_url()}/p/{token}"
