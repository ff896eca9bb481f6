"""API keys for mailers: made once, shown once, stored as a hash, revocable."""

from __future__ import annotations

import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import Conflict, InvalidValue
from ..models import ApiKey, utcnow
from ..store import write_transaction
from .privacy import secret_hash

SCOPES = ("send", "read", "write", "admin")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
PREFIX = "prefs_"


def create_key(session: Session, name: str, scopes: list[str]) -> tuple[ApiKey, str]:
    """Create a key; return it with its secret, which is not stored and cannot be shown again."""
    if not _NAME.match(name or ""):
        raise InvalidValue("a key name is 1 to 100 letters, digits, '.', '_' or '-'")
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise InvalidValue(f"scopes must be among {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}")
    secret = PREFIX + secrets.token_urlsafe(32)
    with write_transaction(session):
        if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
            raise Conflict(f"a key named {name!r} exists already")
        key = ApiKey(name=name, secret_hash=secret_hash(secret), scopes=" ".join(sorted(set(scopes))))
        session.add(key)
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    """Return every key, revoked ones too, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, name: str) -> ApiKey:
    """Revoke a key by name; it stops working at once."""
    with write_transaction(session):
        key = session.scalar(select(ApiKey).where(ApiKey.name == name))
        if key is None:
            raise InvalidValue(f"there is no key named {name!r}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
    return key


def authenticate(session: Session, secret: str) -> ApiKey | None:
    """Return the live key whose secret this is, or None."""
    if not secret.startswith(PREFIX) or len(secret) > 100:
        return None
    wanted = secret_hash(secret)
    key = session.scalar(select(ApiKey).where(ApiKey.secret_hash == wanted))
    if key is None or key.revoked_at is not None:
        return None
    # the look-up is by hash already; compare anyway so no branch depends on the secret
    return key if hmac.compare_digest(key.secret_hash, wanted) else None


def scopes_of(key: ApiKey) -> frozenset[str]:
    """Return a key's scopes."""
    return frozenset(key.scopes.split())
