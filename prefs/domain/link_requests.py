"""Whom the request form mails a link for: found the same way, whoever is asked about.

The form must not tell who is on file (``public.request_link``): not by its answer, its
size or its time, whatever the database is doing. Only a new address needs a write, so
each request runs in one write transaction that takes the lock an insert takes and reads
the same rows; a lock held elsewhere, or a database that is down, meets every address
alike. A write that fails only for a new address (a full disk, a read-only database) is
reported as ``NotRecorded``, which the form answers as it answers everyone.
"""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..errors import NotRecorded, UnknownSubscriber
from ..models import Subscriber, utcnow
from ..store import write_transaction
from .ledger import insert_for, is_erased, new_public_id


def public_id_for(session: Session, email: str) -> str:
    """Return the public id to mail a link for, adding a new address to the subscribers.

    Raise ``UnknownSubscriber`` for an erased address (never brought back), and
    ``NotRecorded`` when a new one could not be added.
    """
    adding = False
    try:
        with write_transaction(session):
            if session.get_bind().dialect.name == "postgresql":
                # what an insert takes: a session that holds inserts up (CREATE INDEX) holds up everyone
                session.execute(text("LOCK TABLE subscribers IN ROW EXCLUSIVE MODE"))
            public_id = _public_id(session, email)
            erased = is_erased(session, email)  # read for every address, not only the new
            if public_id is not None:
                return public_id
            if erased:
                raise UnknownSubscriber("this address was erased and is kept out of all marketing")
            adding = True
            session.execute(
                insert_for(session)(Subscriber)
                .values(email=email, public_id=new_public_id(), created_at=utcnow(), version=0)
                .on_conflict_do_nothing(index_elements=[Subscriber.email])
            )
            # another request may have added it a moment before: that one is on file
            added = _public_id(session, email)
            assert added is not None
            return added
    except DBAPIError as err:
        if adding:  # the insert, or the commit that writes it
            raise NotRecorded("the new address could not be added") from err
        raise


def _public_id(session: Session, email: str) -> str | None:
    return session.scalar(select(Subscriber.public_id).where(Subscriber.email == email))
