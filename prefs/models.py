"""The tables: subscribers, topics, preferences, audit events, API keys, erasures, campaigns, requests,
and the answers kept under idempotency keys.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Constraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .store import tallies

# stable constraint names keep alembic migrations identical on SQLite and PostgreSQL
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


SchemaItemT = TypeVar("SchemaItemT", Index, Constraint)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def only_on(dialect: str, item: SchemaItemT) -> SchemaItemT:
    """Mark an index or constraint as one dialect's: created, and compared, only there."""
    item.info["dialect"] = dialect
    return item.ddl_if(dialect=dialect)


def schema_objects(dialect: str) -> Callable[..., bool]:
    """Return Alembic's ``include_object``: leave out another dialect's indexes and constraints."""

    def include_object(item: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        return reflected or item.info.get("dialect", dialect) == dialect

    return include_object


# SQLite only autoincrements an INTEGER PRIMARY KEY
BigId = BigInteger().with_variant(Integer(), "sqlite")
# what the check reads of a subscriber by address, in one index (see Subscriber)
LOOKUP_COLUMNS = ("email", "public_id", "left_all_reason", "left_all_version", "bounced_at", "id")


class UTCDateTime(TypeDecorator[datetime]):
    """Store aware UTC times; SQLite hands them back naive, so mark them UTC again."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        elif value is not None and value.tzinfo is not UTC:
            # SQLite keeps the wall time and drops the offset: store the instant in UTC
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def iso_time(moment: datetime | None) -> str | None:
    """Return a time as the API writes it: ISO 8601 in UTC, with a ``Z``."""
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


class Subscriber(Base):
    """One normalized address and its subscriber-wide state."""

    __tablename__ = "subscribers"
    # The check's lookup is answered from an index alone: address to everything the verdict
    # and the links need, without a visit to the row (a third of the lookup's time).
    # PostgreSQL: the unique index on the address carries those columns (INCLUDE), so one
    # index on the address serves the lookup, the uniqueness and ON CONFLICT (email), and a
    # new subscriber writes one entry for it, not two. SQLite has no INCLUDE: its
    # unique constraint, plus the lookup index with those columns as keys.
    __table_args__ = (
        only_on(
            "postgresql",
            Index(
                "uq_subscribers_email_lookup",
                "email",
                unique=True,
                postgresql_include=[c for c in LOOKUP_COLUMNS if c != "email"],
            ),
        ),
        only_on("sqlite", UniqueConstraint("email", name="uq_subscribers_email")),
        only_on("sqlite", Index("ix_subscribers_lookup", *LOOKUP_COLUMNS)),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(22), unique=True)
    email: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # bumped by every change to this subscriber, so "the newest explicit choice" is
    # decided by order of writes, not by clocks that may differ between hosts
    version: Mapped[int] = mapped_column(Integer, default=0)
    left_all_reason: Mapped[str | None] = mapped_column(String(16))
    left_all_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    left_all_version: Mapped[int | None] = mapped_column(Integer)
    bounced_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Topic(Base):
    """A kind of marketing mail that people may choose to receive."""

    __tablename__ = "topics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    opt_in: Mapped[bool] = mapped_column(Boolean, default=False)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Preference(Base):
    """A subscriber's explicit choice for one topic."""

    __tablename__ = "preferences"

    subscriber_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    )
    topic_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("topics.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    subscribed: Mapped[bool] = mapped_column(Boolean)
    version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Event(Base):
    """An append-only record of one change: the proof of consent and of withdrawal."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # the writing transaction's id on PostgreSQL (0 on SQLite, whose writers are
    # serialized): the change feed pages by (txid, id) below the oldest open
    # transaction, so a row that commits late is never skipped
    txid: Mapped[int] = mapped_column(BigInteger, default=0)
    subscriber_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("subscribers.id", ondelete="SET NULL"), index=True
    )
    topic_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("topics.id", ondelete="SET NULL"))
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    # the overview ranks campaigns by their opt-outs
    campaign: Mapped[str | None] = mapped_column(String(64), index=True)
    fingerprint: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    __table_args__ = (Index("ix_events_txid_id", "txid", "id"),)


class ApiKey(Base):
    """A mailer's key: only the hash of its secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ErasedAddress(Base):
    """A keyed, non-reversible fingerprint of an erased address, kept out of marketing."""

    __tablename__ = "erased_addresses"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class InstanceSecret(Base):
    """A secret that all hosts share and that must outlive signing-key rotation."""

    __tablename__ = "instance_secrets"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))


class CampaignSend(Base):
    """How many recipients ``/api/v1/check`` allowed for one campaign and topic."""

    __tablename__ = "campaign_sends"

    campaign: Mapped[str] = mapped_column(String(64), primary_key=True)
    topic_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("topics.id", ondelete="CASCADE"), primary_key=True
    )
    allowed: Mapped[int] = mapped_column(BigInteger, default=0)
    first_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # the overview pages the campaigns newest first
    __table_args__ = (Index("ix_campaign_sends_first", "first_at", "campaign"),)


class DataRequest(Base):
    """A data-subject request (access, rectification, erasure, objection) due within 30 days.

    The raw address is kept only while the request is open, to act on it; the keyed
    fingerprint stays, so the register still proves the request was answered.
    """

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    email: Mapped[str | None] = mapped_column(String(320))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    # the masked address for the register's lists; "erased" once the subject is erased
    label: Mapped[str] = mapped_column(String(330))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(32))
    note: Mapped[str] = mapped_column(Text, default="")

    # the register's pages: the open ones by due date, the done ones newest first; each
    # index holds only its own rows, so a page never steps over the other kind
    __table_args__ = (
        Index(
            "ix_requests_open",
            "due_at",
            "id",
            sqlite_where=completed_at.is_(None),
            postgresql_where=completed_at.is_(None),
        ),
        Index(
            "ix_requests_done",
            "completed_at",
            "id",
            sqlite_where=completed_at.is_not(None),
            postgresql_where=completed_at.is_not(None),
        ),
    )


class IdempotencyKey(Base):
    """A request's answer, kept for a while under the key its sender gave it, for a retry.

    ``scope`` says whose keys they are: one API key's events (``events:<id>``), say, or a
    provider's webhooks, whose key is the provider's event id. Only hashes of the key and
    of the request are kept, with the answer given.
    """

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    answer: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AudienceTally(Base):
    """Part of a running count of preferences by topic and class, or of subscribers (topic 0).

    Kept by triggers (``prefs.tallies``); a count is the sum of its shards.
    """

    __tablename__ = "audience_tallies"

    topic_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class OptOutTally(Base):
    """Part of a running count of unsubscribe events on one UTC day, by topic (0: all) and source."""

    __tablename__ = "opt_out_tallies"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    topic_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class CampaignTally(Base):
    """Part of a running count of the unsubscribe events a campaign's links brought."""

    __tablename__ = "campaign_tallies"

    campaign: Mapped[str] = mapped_column(String(64), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


@event.listens_for(Base.metadata, "after_create")
def _install_tallies(target: Any, connection: Any, **kw: Any) -> None:
    # create_all (the tests, a demo) gets the triggers the migrations install
    tallies.install(connection)
