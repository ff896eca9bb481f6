"""Answer a request sent again under the same idempotency key as it was answered the first time.

A sender whose answer was lost (a timeout, a worker killed after the commit) sends the same
request again with the same key. ``once`` runs the work only the first time, in the write
transaction that keeps its answer, so a committed change always has its answer on file and
a retry gets it byte for byte. Two requests with one key at once: the second waits on the
first's key (the first in the ledger's lock order), then gets its answer. Keys are kept
``TTL``; each new key deletes up to ``SWEEP`` expired ones.

Only SHA-256 hashes of the key and of the request are kept, with the answer. ``scope``
says whose keys they are (one API key's events; later a provider's webhooks, whose key is
the provider's event id), so one sender's keys never meet another's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ..errors import IdempotencyKeyInUse, IdempotencyKeyReused
from ..models import IdempotencyKey, utcnow
from ..store import lock_wait, run_committed
from .ledger import insert_for

TTL = timedelta(hours=24)
# expired keys deleted with each new one: bounded work, and more than one, so they never pile up
SWEEP = 100


@dataclass(frozen=True, slots=True)
class Answer:
    """What a request was answered: its status and body; ``replayed`` if kept from an earlier one."""

    status: int
    body: str
    replayed: bool = False


def digest(value: str) -> str:
    """Return the SHA-256 of a text, in hex."""
    return hashlib.sha256(value.encode()).hexdigest()


def request_digest(data: Any) -> str:
    """Return the hash of a JSON request, the same whatever its key order and spacing."""
    return digest(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str))


def kept(
    session: Session, scope: str, key: str, request_hash: str, now: datetime | None = None
) -> Answer | None:
    """Return the answer kept under this key, if any; raise ``IdempotencyKeyReused`` if another request's."""
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.scope == scope,
            IdempotencyKey.key_hash == digest(key),
            IdempotencyKey.created_at >= (now or utcnow()) - TTL,
        )
    )
    return None if row is None else _replay(row, request_hash)


def once(
    session: Session,
    scope: str,
    key: str,
    request_hash: str,
    work: Callable[[], tuple[int, str]],
    now: datetime | None = None,
) -> Answer:
    """Run ``work`` and keep its answer under the key, in one write transaction; or return the kept one.

    ``work`` returns the status and body of the answer; it runs in the caller's write
    transaction (what it records joins it), and again if that transaction is retried.
    """
    now = now or utcnow()
    key_hash = digest(key)

    def attempt() -> Answer:
        if not _claim(session, scope, key_hash, request_hash, now):
            row = session.get(IdempotencyKey, (scope, key_hash), populate_existing=True)
            assert row is not None, "a claimed key is never deleted before it expires"
            return _replay(row, request_hash)
        _sweep(session, now)
        status, body = work()
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.scope == scope, IdempotencyKey.key_hash == key_hash)
            .values(status=status, answer=body)
            .execution_options(synchronize_session=False)
        )
        return Answer(status, body)

    return run_committed(session, attempt)


def _claim(session: Session, scope: str, key_hash: str, request_hash: str, now: datetime) -> bool:
    """Take the key for this request; tell whether it was free (new, or expired)."""
    insert = insert_for(session)(IdempotencyKey).values(
        scope=scope, key_hash=key_hash, request_hash=request_hash, created_at=now
    )
    # a key in use by a request not yet committed: wait for it (PostgreSQL), then see its answer
    claim = insert.on_conflict_do_update(
        index_elements=[IdempotencyKey.scope, IdempotencyKey.key_hash],
        set_={"request_hash": request_hash, "status": None, "answer": None, "created_at": now},
        where=IdempotencyKey.created_at < now - TTL,
    ).returning(IdempotencyKey.scope)
    try:
        return session.execute(claim).first() is not None
    except OperationalError as err:
        if lock_wait(err):
            raise IdempotencyKeyInUse("a request with this key is still being answered; try again") from None
        raise


def _sweep(session: Session, now: datetime) -> None:
    expired = (
        select(IdempotencyKey.scope, IdempotencyKey.key_hash)
        .where(IdempotencyKey.created_at < now - TTL)
        .order_by(IdempotencyKey.created_at)
        .limit(SWEEP)
        # another request sweeping the same keys: leave them to it, never wait
        .with_for_update(skip_locked=True)
    )
    session.execute(
        delete(IdempotencyKey)
        .where(tuple_(IdempotencyKey.scope, IdempotencyKey.key_hash).in_(expired))
        .execution_options(synchronize_session=False)
    )


def _replay(row: IdempotencyKey, request_hash: str) -> Answer:
    if row.request_hash != request_hash:
        raise IdempotencyKeyReused("this idempotency key was used for another request")
    assert row.status is not None and row.answer is not None, "a key is kept with its answer"
    return Answer(row.status, row.answer, replayed=True)
