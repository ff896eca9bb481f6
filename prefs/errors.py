"""The domain's own exceptions; each surface maps them to its responses once."""


class DomainError(Exception):
    """Something the caller asked for cannot be done; the message says why."""

    code = "invalid_request"


class InvalidAddress(DomainError):
    """The text is not a valid email address."""

    code = "invalid_address"


class InvalidToken(DomainError):
    """A link's token is tampered, truncated, of another purpose or signed by an unknown key."""

    code = "invalid_token"


class UnknownTopic(DomainError):
    """No topic has this key."""

    code = "unknown_topic"


class UnknownSubscriber(DomainError):
    """No subscriber has this address or public id (it may have been erased)."""

    code = "unknown_subscriber"


class NotRecorded(DomainError):
    """The database refused a write the request needed (a full disk, a read-only database)."""

    code = "not_recorded"


class Conflict(DomainError):
    """The thing to be created exists already."""

    code = "conflict"


class InvalidValue(DomainError):
    """A value is not of the expected form."""

    code = "invalid_value"


class UnknownRequest(DomainError):
    """No data-subject request has this id."""

    code = "unknown_request"


class InvalidMessage(DomainError):
    """The body is not an RFC 5322 message we can read within our bounds."""

    code = "invalid_message"


class MessageTooLarge(InvalidMessage):
    """The message, or its header section, is larger than we read."""

    code = "message_too_large"


class TryLater(DomainError):
    """The message cannot be judged now (a DNS answer is missing); the sender should retry."""

    code = "try_later"


class IdempotencyKeyReused(DomainError):
    """An idempotency key came again with another request than the one it was first used for."""

    code = "idempotency_key_reused"


class IdempotencyKeyInUse(DomainError):
    """A request with this idempotency key is still being answered."""

    code = "idempotency_key_in_use"


class Busy(DomainError):
    """Too much of this is under way at once; the same request may work a little later."""

    code = "unavailable"
