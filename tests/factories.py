"""Small factories for the objects tests need."""

from __future__ import annotations

from sqlalchemy.orm import Session

from prefs import ledger, topics
from prefs.models import Subscriber, Topic


def make_topic(session: Session, key: str = "news", opt_in: bool = False, name: str = "") -> Topic:
    """Create a topic, opt-out unless asked otherwise."""
    return topics.create_topic(session, key, name or key.title(), f"About {key}", opt_in)


def make_subscriber(session: Session, email: str = "ann@example.com") -> Subscriber:
    """Create (or find) the subscriber of a normalized address."""
    return ledger.ensure_subscriber(session, email)


def make_key(session: Session, *scopes: str, name: str = "") -> str:
    """Create an API key with these scopes and return its secret."""
    from prefs import keys

    _, secret = keys.create_key(session, name or "key-" + "-".join(scopes or ("none",)), list(scopes))
    return secret


def bearer(secret: str) -> dict[str, str]:
    """Return the Authorization header for a key."""
    return {"Authorization": f"Bearer {secret}"}
