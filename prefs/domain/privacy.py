"""Keyed, non-reversible fingerprints: of an erased address, of a client, of an API key, of a limit."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..models import InstanceSecret
from ..store import write_transaction

_KEY_NAME = "fingerprint-key"
_keys: dict[str, bytes] = {}


def fingerprint_key(session: Session) -> bytes:
    """Return the key every host shares for fingerprints, made once per database.

    It lives in the database, not in ``PREFS_SECRET_KEYS``: an erased address must stay
    recognisable after the signing keys have been rotated away.
    """
    url = str(session.get_bind().engine.url)
    key = _keys.get(url)
    if key is None:
        value = session.scalar(select(InstanceSecret.value).where(InstanceSecret.name == _KEY_NAME))
        if value is None:
            value = _create_key(session)
        key = _keys[url] = bytes.fromhex(value)
    return key


def _create_key(session: Session) -> str:
    from .ledger import insert_for

    # several hosts may make it at once: the first insert wins, everyone reads that one
    with write_transaction(session, events=False):
        session.execute(
            insert_for(session)(InstanceSecret)
            .values(name=_KEY_NAME, value=secrets.token_hex(32))
            .on_conflict_do_nothing(index_elements=[InstanceSecret.name])
        )
    value = session.scalar(select(InstanceSecret.value).where(InstanceSecret.name == _KEY_NAME))
    assert value is not None
    return value


def forget_cached_keys() -> None:
    """Drop the cached keys (tests make a new database with the same URL)."""
    _keys.clear()


def address_fingerprint(key: bytes, address: str) -> str:
    """Return the fingerprint of a normalized address."""
    return hmac.new(key, b"address:" + address.encode(), hashlib.sha256).hexdigest()


def client_fingerprint(key: bytes, ip: str | None, user_agent: str | None) -> str | None:
    """Return a short fingerprint of a client for the audit trail; never the raw IP."""
    if not ip and not user_agent:
        return None
    data = f"client:{ip or ''}|{user_agent or ''}".encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:32]


def limit_key(key: bytes, kind: str, value: str) -> str:
    """Return a rate limit's key for a value (a client, a token, a mailbox): a keyed hash of it."""
    return f"{kind}:" + hmac.digest(key, f"ratelimit:{kind}:{value}".encode(), "sha256").hex()[:32]


def secret_hash(secret: str) -> str:
    """Return the stored form of an API key's secret (high-entropy, so a plain hash suffices)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def address_fingerprinter(key: bytes) -> Callable[[str], str]:
    """Return ``address_fingerprint`` for one key, on the one-shot C path that bulk imports need."""

    def fingerprint(address: str) -> str:
        return hmac.digest(key, b"address:" + address.encode(), "sha256").hex()

    return fingerprint
