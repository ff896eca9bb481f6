"""Sign and verify the tokens in links: one salt per purpose, a list of keys, newest last.

A token is ``<public id>.<topic>[.<campaign>].<time>.<signature>``: an
``itsdangerous.TimestampSigner`` over a compact string, never an address.  An
empty topic means all marketing.  The time lets an operator turn on a maximum
age later without breaking the links already in inboxes; with one set, a link minted by a
host whose clock runs up to ``MAX_CLOCK_SKEW`` seconds ahead is good at once.
"""

from __future__ import annotations

import hmac
import re
import time
from base64 import urlsafe_b64encode
from binascii import b2a_base64
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import blake2b, sha1
from typing import NamedTuple

from itsdangerous import BadSignature, TimestampSigner
from itsdangerous.encoding import base64_decode, int_to_bytes

from ..errors import InvalidToken, InvalidValue

UNSUBSCRIBE = "unsubscribe"
PREFERENCES = "preferences"
UNDO = "undo"
PURPOSES = (UNSUBSCRIBE, PREFERENCES, UNDO)

CAMPAIGN = re.compile(r"[A-Za-z0-9._~-]{1,64}\Z")
_PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{16,22}\Z")
_TOPIC = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")
# an undo form's reference: public id . event id . subscriber's version . topic . the prior
# choice (version~source~microseconds since 1970), if any . the digest of the link it was earned on
_UNDO = re.compile(
    r"(?P<public_id>[A-Za-z0-9_-]{16,22})\.(?P<event>[1-9][0-9]{0,17})\.(?P<at_version>[0-9]{1,9})"
    r"\.(?P<topic>[a-z0-9_-]{0,64})"
    r"\.(?:(?P<version>[0-9]{1,9})~(?P<source>[a-z-]{1,16})~(?P<at>-?[0-9]{1,18}))?"
    r"\.(?P<link>[A-Za-z0-9_-]{16})\Z"
)
MAX_TOKEN = 256
# with a maximum age set, a link minted up to this many seconds ahead of this host's clock
# (on a host whose clock runs ahead) is good, and one minted further ahead is not
MAX_CLOCK_SKEW = 300
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class UnsubscribeToken:
    """What an unsubscribe link names: who, which topic (None for all marketing), which send."""

    public_id: str
    topic: str | None
    campaign: str | None


class PriorChoice(NamedTuple):
    """A topic's explicit choice that a click replaced: on, since this version, from this source."""

    version: int
    source: str
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class UndoToken:
    """What an undo form names: one click's audit event, and the choice (None: none) it replaced."""

    public_id: str
    event_id: int
    version: int  # the subscriber's version once the click was recorded
    topic: str | None  # None: the click left all marketing
    prior: PriorChoice | None = None


def _link_digest(link: str) -> str:
    """Name a link in an undo reference: 12 bytes of its token's hash, URL-safe."""
    return urlsafe_b64encode(blake2b(link.encode("utf-8", "surrogatepass"), digest_size=12).digest()).decode()


_URLSAFE = bytes.maketrans(b"+/", b"-_")
# itsdangerous signs with HMAC-SHA1, which stays sound as an HMAC (RFC 6151)
_BLOCK = sha1().block_size  # noqa: S324


class _Purpose:
    """Sign and verify for one purpose; signing skips itsdangerous' per-call key derivation."""

    def __init__(self, keys: list[str], purpose: str, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.signer = TimestampSigner(keys, salt=f"prefs.{purpose}")
        # the signature itsdangerous makes and checks, HMAC-SHA1 over the derived key,
        # written out as RFC 2104 defines it (as the stdlib's hmac module does) so the two
        # padded hash states are made once and each token costs two copies of them
        key = self.signer.derive_key()
        if len(key) > _BLOCK:
            key = sha1(key).digest()  # noqa: S324
        block = key.ljust(_BLOCK, b"\0")
        self._inner = sha1(bytes(b ^ 0x36 for b in block))  # noqa: S324
        self._outer = sha1(bytes(b ^ 0x5C for b in block))  # noqa: S324
        self._stamp_at = -1
        self._stamp = b""

    def _stamp_now(self) -> bytes:
        now = int(self.clock())
        if now != self._stamp_at:
            self._stamp = urlsafe_b64encode(int_to_bytes(now)).rstrip(b"=")
            self._stamp_at = now
        return self._stamp

    def minter(self, tail: str) -> Callable[[str], str]:
        """Return a function that signs ``value + tail`` for any value, stamped now.

        A check mints thousands of tokens that differ only in their first field: the
        rest is encoded once, and the loop does nothing but hash and encode.
        """
        end = tail.encode() + b"." + self._stamp_now()
        inner, outer = self._inner.copy, self._outer.copy

        def mint(value: str) -> str:
            signed = value.encode() + end
            digest = inner()
            digest.update(signed)
            mac = outer()
            mac.update(digest.digest())
            signature = b2a_base64(mac.digest(), newline=False).translate(_URLSAFE).rstrip(b"=")
            return (signed + b"." + signature).decode()

        return mint

    def sign(self, value: str) -> str:
        return self.minter("")(value)

    def unsign(self, token: str, max_age: int | None) -> str:
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN or not token.isascii():
            raise InvalidToken("the link is not valid")
        try:
            if max_age is None:
                value = self.signer.unsign(token).decode()
            else:
                raw, signed_at = self.signer.unsign(token, return_timestamp=True)
                # another host's clock may run ahead of this one's: its fresh links are good
                age = int(self.clock()) - int(signed_at.timestamp())
                if not -MAX_CLOCK_SKEW <= age <= max_age:
                    raise InvalidToken("the link is not valid")
                value = raw.decode()
        except BadSignature:
            raise InvalidToken("the link is not valid") from None
        # base64 leaves spare bits in the signature's last character: a link with that
        # character changed decodes to the same signature, yet is not the link we sent
        signature = token.rsplit(".", 1)[1].encode()
        if urlsafe_b64encode(base64_decode(signature)).rstrip(b"=") != signature:
            raise InvalidToken("the link is not valid")
        return value


def check_campaign(campaign: str) -> str:
    """Return a campaign id a link can carry, or raise ``InvalidValue``."""
    if not isinstance(campaign, str) or not CAMPAIGN.match(campaign):
        raise InvalidValue("a campaign id is 1 to 64 letters, digits or . _ ~ -")
    return campaign


class Tokens:
    """Mint and read the tokens for unsubscribe and preference links."""

    def __init__(
        self, keys: list[str], max_age: int | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        if not keys:
            raise ValueError("at least one signing key is needed")
        self.max_age = max_age
        clock = clock or time.time
        self._unsubscribe = _Purpose(keys, UNSUBSCRIBE, clock)
        self._preferences = _Purpose(keys, PREFERENCES, clock)
        self._undo = _Purpose(keys, UNDO, clock)

    def unsubscribe(self, public_id: str, topic: str | None = None, campaign: str | None = None) -> str:
        """Return the token of an unsubscribe link."""
        return self.unsubscribe_minter(topic, campaign)(public_id)

    def unsubscribe_minter(
        self, topic: str | None = None, campaign: str | None = None
    ) -> Callable[[str], str]:
        """Return a function of a public id that mints its unsubscribe token for one send."""
        if campaign is not None:
            check_campaign(campaign)
        tail = "." + (topic or "")
        if campaign:
            tail += "." + campaign
        return self._unsubscribe.minter(tail)

    def preferences(self, public_id: str) -> str:
        """Return the token of a preference-center link."""
        return self._preferences.sign(public_id)

    def preferences_minter(self) -> Callable[[str], str]:
        """Return a function of a public id that mints its preferences token."""
        return self._preferences.minter("")

    def read_unsubscribe(self, token: str) -> UnsubscribeToken:
        """Return what an unsubscribe token names, or raise ``InvalidToken``."""
        fields = self._unsubscribe.unsign(token, self.max_age).split(".", 2)
        if len(fields) < 2 or not _PUBLIC_ID.match(fields[0]):
            raise InvalidToken("the link is not valid")
        topic = fields[1] or None
        if topic is not None and not _TOPIC.match(topic):
            raise InvalidToken("the link is not valid")
        campaign = fields[2] if len(fields) == 3 else None
        return UnsubscribeToken(fields[0], topic, campaign)

    def read_preferences(self, token: str) -> str:
        """Return the public id of a preferences token, or raise ``InvalidToken``."""
        public_id = self._preferences.unsign(token, self.max_age)
        if not _PUBLIC_ID.match(public_id):
            raise InvalidToken("the link is not valid")
        return public_id

    def read_for_preferences(self, token: str) -> str:
        """Return the public id that may open the preference center: either kind of token."""
        try:
            return self.read_preferences(token)
        except InvalidToken:
            return self.read_unsubscribe(token).public_id

    def undo(self, ref: UndoToken, link: str) -> str:
        """Return the signed reference an undo form carries: no address, only ids and versions.

        It names the link whose click earned it: only that link's page takes it back.
        """
        prior = ""
        if ref.prior is not None:
            micros = (ref.prior.updated_at - _EPOCH) // timedelta(microseconds=1)
            prior = f"{ref.prior.version}~{ref.prior.source}~{micros}"
        body = f"{ref.public_id}.{ref.event_id}.{ref.version}.{ref.topic or ''}.{prior}.{_link_digest(link)}"
        return self._undo.sign(body)

    def read_undo(self, token: str, link: str) -> UndoToken:
        """Return what an undo form's reference names, or raise ``InvalidToken``.

        ``link`` is the token of the link it is posted to, which must be the one that earned it.
        """
        found = _UNDO.match(self._undo.unsign(token, self.max_age))
        if found is None or not hmac.compare_digest(found["link"], _link_digest(link)):
            raise InvalidToken("the link is not valid")
        prior = None
        if found["version"] is not None:
            at = _EPOCH + timedelta(microseconds=int(found["at"]))
            prior = PriorChoice(int(found["version"]), found["source"], at)
        return UndoToken(
            found["public_id"], int(found["event"]), int(found["at_version"]), found["topic"] or None, prior
        )
