"""Small factories for the objects tests need."""

from __future__ import annotations

from sqlalchemy.orm import Session

from prefs.domain import ledger, topics
from prefs.models import Subscriber, Topic
from prefs.web import links


def make_topic(session: Session, key: str = "news", opt_in: bool = False, name: str = "") -> Topic:
    """Create a topic, opt-out unless asked otherwise."""
    return topics.create_topic(session, key, name or key.title(), f"About {key}", opt_in)


def make_subscriber(session: Session, email: str = "ann@example.com") -> Subscriber:
    """Create (or find) the subscriber of a normalized address."""
    return ledger.ensure_subscriber(session, email)


def make_key(session: Session, *scopes: str, name: str = "") -> str:
    """Create an API key with these scopes and return its secret."""
    from prefs.domain import keys

    _, secret = keys.create_key(session, name or "key-" + "-".join(scopes or ("none",)), list(scopes))
    return secret


def bearer(secret: str) -> dict[str, str]:
    """Return the Authorization header for a key."""
    return {"Authorization": f"Bearer {secret}"}


def unsubscribe_token(subscriber: Subscriber, topic: str | None = None, campaign: str | None = None) -> str:
    """Return the token of an unsubscribe link, as a mailer would put it in a message."""
    return links.tokens().unsubscribe(subscriber.public_id, topic, campaign)


def preferences_token(subscriber: Subscriber) -> str:
    """Return the token of a preference-center link."""
    return links.tokens().preferences(subscriber.public_id)


def events(session: Session, subscriber: Subscriber) -> list[tuple[str, str | None, str, str | None]]:
    """Return a subscriber's audit trail as (action, topic key, source, campaign), oldest first."""
    return [(e.action, key, e.source, e.campaign) for e, key in ledger.history(session, subscriber)]


def allowed(session: Session, email: str, key: str) -> bool:
    """Tell whether the category may be sent to the address now."""
    return ledger.verdict_for(session, email, key).allowed
